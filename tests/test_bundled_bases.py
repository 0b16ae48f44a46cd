"""The two bundled bases by name, plain-text prompts for a model without a chat template, and
`prompt check` saying which rendering a prompt's model uses (no model is loaded for any of it)."""

from __future__ import annotations

import json

import pytest

from tunelab.errors import UserError
from tunelab.models import template_of
from tunelab.models.chat import end_of_turn_ids, plain_text, render_chat, template_name
from tunelab.models.weights import BUNDLED, bundled, resolve_model_dir


def test_bundled_names_and_aliases():
    assert bundled(None).name == "smollm2-135m"
    assert bundled("Gemma3") is BUNDLED["gemma3-270m"] and bundled("gemma-3-270m") is BUNDLED["gemma3-270m"]
    assert bundled("smollm2") is BUNDLED["smollm2-135m"] and bundled("llama-7b") is None
    assert BUNDLED["gemma3-270m"].template == "plain text" and BUNDLED["smollm2-135m"].template == "chat template"
    with pytest.raises(UserError, match="bundled models: smollm2-135m, gemma3-270m"):
        resolve_model_dir("/nonexistent/model")


class PlainTokenizer:
    """A tokenizer without a chat template that puts its bos token first (as Gemma's does)."""

    chat_template = None
    bos_token, bos_token_id, eos_token_id = "<bos>", 2, 1

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_plain_text_rendering_for_a_base_model():
    tok = PlainTokenizer()
    messages = [{"role": "system", "content": "Route tickets."}, {"role": "user", "content": "charged twice"},
                {"role": "assistant", "content": "billing"}, {"role": "user", "content": "cannot log in"}]
    text = render_chat(tok, messages)
    assert text == ("<bos>system:\nRoute tickets.\nuser:\ncharged twice\nassistant:\nbilling\n"
                    "user:\ncannot log in\nassistant:\n")
    assert plain_text(messages[:1]) == "system:\nRoute tickets.\nassistant:\n"
    assert end_of_turn_ids(tok) == [ord("\n")]  # an answer ends at a newline
    assert template_name(tok) == "plain text"


def test_template_of_names_the_rendering(tmp_path):
    assert template_of("gemma3-270m") == "plain text" and template_of("smollm2-135m") == "chat template"
    assert template_of("local:gemma3") == "plain text"
    assert template_of("openai:gpt-4o-mini") == "the server's chat template"
    assert template_of("fake").startswith("none")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert template_of(str(folder)) == "chat template"
    (folder / "tokenizer_config.json").write_text("{}")
    assert template_of(f"local:{folder}") == "plain text"


def test_prompt_check_says_which_template(cli, workspace):
    (workspace.prompts_dir / "g.prompt").write_text(
        "---\nmodel: gemma3-270m\noutput: {type: label, labels: [a, b]}\n---\nuser:\nPick one: {{ input }}\n")
    r = cli("prompt", "check", "g")
    assert r.exit_code == 0, r.output
    assert "model gemma3-270m, rendered with plain text" in " ".join(r.stdout.split())
    r = cli("prompt", "check", "g", "--json")
    assert json.loads(r.stdout)["template"] == "plain text"


def test_gguf_export_of_another_architecture_says_what_it_needs(tmp_path, monkeypatch):
    from tunelab.models import gguf

    folder = tmp_path / "gemma"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForCausalLM"]}))
    monkeypatch.setattr(gguf, "find_converter", lambda script=None: None)
    with pytest.raises(UserError) as err:
        gguf.to_gguf(folder, tmp_path / "out.gguf", adapter_dir=tmp_path / "no-adapter-needed")
    message = err.value.format()
    assert "Gemma3ForCausalLM" in message and "convert_hf_to_gguf.py" in message and "\n" not in message
