"""Prompts: a template file `prompts/NAME.prompt` plus its version history.

    prompt = load_prompt(ws, "support@production")    # NAME, NAME@VERSION, NAME@LABEL, NAME@current
    prompt.render(example)                            # chat messages (demos included)
    prompt.request(example, demos)                    # a model Request: messages, labels or JSON schema
    version = commit_prompt(ws, "support", "first version")

Modules: `spec` (the typed front matter, the content hash), `template` (the sandboxed Jinja2
body, `Prompt`, `parse_prompt`), `versions` (the working file, commits, labels, diff, rollback).
"""

from tunelab.prompts.spec import (Demo, DemoSource, FrontMatter, JudgeRubric, OutputSpec, canonical_body, canonical_front_matter,
                                  content_hash, format_prompt)
from tunelab.prompts.sandbox import MAX_RENDERED, RENDER_SECONDS, jinja_env
from tunelab.prompts.template import (ROLES, SAMPLE_INPUT, Part, Prompt, as_example, compile_part, demos_data,
                                      join_parts, parse_prompt, split_body)
from tunelab.prompts.versions import (OVERRIDABLE, RESERVED_LABELS, SUFFIX, Commit, Deploy, PromptSummary, check_prompt,
                                      commit_prompt, deploy_log, label_overrides,
                                      current_version, default_author, diff_prompts, list_labels, list_prompt_names,
                                      list_prompts, load_prompt, parse_ref, prompt_labels, prompt_log, prompt_path,
                                      prompt_versions, read_prompt_file, resolve_version, rollback_prompt, save_version,
                                      show_prompt, tag_prompt)

__all__ = ["MAX_RENDERED", "OVERRIDABLE", "RENDER_SECONDS", "Commit", "Deploy", "Demo", "DemoSource", "FrontMatter",
           "JudgeRubric", "OutputSpec", "Part", "Prompt", "PromptSummary",
           "RESERVED_LABELS", "ROLES", "SAMPLE_INPUT", "SUFFIX", "as_example", "canonical_body",
           "canonical_front_matter", "check_prompt", "commit_prompt", "compile_part", "content_hash",
           "current_version", "default_author", "deploy_log", "label_overrides", "demos_data", "diff_prompts", "format_prompt", "jinja_env",
           "join_parts", "list_labels", "list_prompt_names", "list_prompts", "load_prompt", "parse_prompt",
           "parse_ref", "prompt_labels", "prompt_log", "prompt_path", "prompt_versions", "read_prompt_file",
           "resolve_version", "rollback_prompt", "save_version", "show_prompt", "split_body", "tag_prompt"]
