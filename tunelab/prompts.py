"""Prompts: a template file `prompts/NAME.prompt` plus its version history.

A prompt file is YAML front matter and a body:

    ---
    model: smollm2-135m          # optional: default the workspace's default_model
    temperature: 0
    max_tokens: 16               # default 16 for label outputs, 256 otherwise
    output: {type: label, labels: [spam, ham]}   # or {type: json, schema: {...}}, or text
    demos:                       # few-shot demos: inline ...
      - {input: "WIN a prize", output: spam}
    # demos: {dataset: sms, split: train, k: 4, strategy: stratified, seed: 0}   # ... or drawn
    # demos: {dataset: sms@3f2a9c81d0e4, split: train, k: 4, strategy: knn_tfidf}  # ... or per input
    description: free text
    ---
    system:
    Classify the message as one of: {{ labels | join(", ") }}.
    user:
    {{ input }}

A line that is exactly `system:`, `user:` or `assistant:` starts a part; a body without such a
line is one user part. Parts are Jinja2 templates rendered in a sandbox
(`ImmutableSandboxedEnvironment`, `StrictUndefined`, no autoescape) with the example's fields:
`input`, every extra field of the example, `labels`, `schema` (JSON text) and `demos` (a list of
dicts with `input`, `output` and the demo's other fields). The expected `output` of the example
being answered is never visible. Block tags trim their own line (`trim_blocks`, `lstrip_blocks`),
so `{% for %}` loops do not leave blank lines; each rendered part is stripped. Few-shot demos become user/assistant turns placed after the
system part and before the final user turn, unless the template uses `demos` itself.

Demos drawn from a dataset split (`demos: {dataset: NAME[@VERSION], split, k, strategy, seed}`):
`random` and `stratified` (labels in turn) draw `k` examples once, with `seed`; the nearest-neighbour
strategies choose per input the `k` examples of the split most similar to the input being answered,
the most similar one last (next to the question): `knn_tfidf` by TF-IDF cosine (unigrams and
bigrams), `knn_embed` by the sentence embeddings of the bundled all-MiniLM-L6-v2 encoder. Their
choice is deterministic (ties go to the earlier example of the split), never shows an example whose
input is exactly the input being answered (so a train example is never its own demo), and takes no
`seed`. The optimizer commits its nearest-neighbour winners this way, with the dataset version
pinned (`NAME@VERSION`); a dataset without a version means its newest version. A missing dataset or
split, or `k` larger than the split, is an error naming the prompt file and the field `demos`.
`Prompt.resolve_demos(ws)` gives a list of Examples for inline and drawn demos, and a
`DemoSelector` (`.select(example) -> list[Example]`, its index built once per process per dataset
version) for per-input ones; `render` and `request` take either.

Versions are content hashes (sha256 of the canonical front matter JSON plus the body, first 12 hex
digits): the same content gets the same version on any machine. A commit records which version
became current, its parent, message, author and time; labels such as `production` point at a
version. A reference is `NAME` (the working file), `NAME@VERSION` (a unique prefix is enough),
`NAME@LABEL` or `NAME@current` (the newest commit).
"""

from __future__ import annotations

import difflib
import getpass
import hashlib
import json
import os
import random
import re
import subprocess
import threading
import traceback
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from tunelab.datasets import Example, validate_name
from tunelab.errors import NotFound, UserError
from tunelab.models.base import Message, Request

if TYPE_CHECKING:
    from jinja2 import Template

    from tunelab.workspace import Workspace

ROLES = ("system", "user", "assistant")
SUFFIX = ".prompt"
_ROLE_LINE = re.compile(r"^(system|user|assistant):[ \t]*$")
_FENCE = re.compile(r"^---[ \t]*$")
MAX_RENDERED = 1_000_000  # characters a `*` or `**` inside a template may produce


# -- front matter ------------------------------------------------------------------------------
class OutputSpec(BaseModel):
    """What the model must answer: one of `labels`, JSON (optionally matching `schema`), or text."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["label", "json", "text"] = Field("text", description="label, json or text")
    labels: list[str] | None = Field(None, description="type label: the allowed answers")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="type json: a JSON Schema")

    @property
    def schema(self) -> dict[str, Any] | None:  # type: ignore[override]
        return self.schema_

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):  # `output: text` / `output: json`
            return {"type": data}
        return data

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: list[str] | None) -> list[str] | None:
        if labels is None:
            return None
        if not labels:
            raise ValueError("needs at least one label")
        if any(not str(x).strip() for x in labels):
            raise ValueError("labels must not be empty strings")
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"duplicate labels: {', '.join(dupes)}")
        return labels

    @model_validator(mode="after")
    def _consistent(self) -> "OutputSpec":
        if self.type == "label" and not self.labels:
            raise ValueError("type label needs 'labels: [...]'")
        if self.type != "label" and self.labels is not None:
            raise ValueError(f"'labels' is only for type label (this output is type {self.type})")
        if self.type != "json" and self.schema_ is not None:
            raise ValueError(f"'schema' is only for type json (this output is type {self.type})")
        if self.schema_ is not None:
            import jsonschema

            try:
                jsonschema.validators.validator_for(self.schema_).check_schema(self.schema_)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"invalid JSON schema: {exc.message}") from None
        return self


PER_INPUT_STRATEGIES = ("knn_tfidf", "knn_embed")


class DemoSource(BaseModel):
    """Few-shot demos drawn from a dataset split: once (`random`, `stratified`), or per input
    (`knn_tfidf`, `knn_embed`: the `k` examples nearest to the input being answered)."""

    model_config = ConfigDict(extra="forbid")
    dataset: str = Field(description="dataset name, optionally NAME@VERSION")
    split: str = Field("train", description="the split to draw from (never the test split you report)")
    strategy: Literal["random", "stratified", "knn_tfidf", "knn_embed"] = Field(
        "random", description="random, stratified (one label at a time), or per input: knn_tfidf, knn_embed")
    k: int = Field(4, ge=0, le=64, description="how many demos")
    seed: int = Field(0, description="seed of the draw (random and stratified only)")

    @property
    def per_input(self) -> bool:
        return self.strategy in PER_INPUT_STRATEGIES

    @field_validator("k")
    @classmethod
    def _k(cls, k: int, info: ValidationInfo) -> int:
        strategy = info.data.get("strategy")
        if strategy in PER_INPUT_STRATEGIES and k < 1:
            raise ValueError(f"strategy {strategy} needs k of at least 1 (got {k})")
        return k

    @field_validator("seed")
    @classmethod
    def _seed(cls, seed: int, info: ValidationInfo) -> int:
        strategy = info.data.get("strategy")
        if strategy in PER_INPUT_STRATEGIES and seed != 0:
            raise ValueError(f"strategy {strategy} chooses its demos deterministically and takes no seed")
        return seed


class Demo(BaseModel):
    """An inline few-shot demo: `input`, `output`, and any other fields the template uses."""

    model_config = ConfigDict(extra="allow")
    input: str
    output: str | dict | list

    @field_validator("output", mode="before")
    @classmethod
    def _scalar_output(cls, value: Any) -> Any:
        if isinstance(value, (int, float, bool)):
            return str(value)
        return value

    def to_example(self) -> Example:
        out = self.output if isinstance(self.output, str) else json.dumps(self.output, ensure_ascii=False)
        return Example(input=self.input, output=out, meta=dict(self.model_extra or {}))


def _demos_form(value: Any) -> str | None:
    if isinstance(value, (dict, DemoSource)):
        return "dataset"
    if isinstance(value, list):
        return "inline"
    return None


class FrontMatter(BaseModel):
    """The front matter of a prompt file. Unknown keys are errors, so a typo is never ignored."""

    model_config = ConfigDict(extra="forbid")
    description: str | None = Field(None, description="free text")
    model: str | None = Field(None, description="model spec; default the workspace's default_model")
    temperature: float = Field(0.0, ge=0, le=2, description="sampling temperature")
    max_tokens: int | None = Field(None, ge=1, le=32768, description="default 16 for label, 256 otherwise")
    output: OutputSpec = Field(default_factory=OutputSpec)
    demos: Annotated[Union[Annotated[list[Demo], Tag("inline")], Annotated[DemoSource, Tag("dataset")]],
                     Discriminator(_demos_form, custom_error_type="demos_form",
                                   custom_error_message="expected a list of {input, output} demos "
                                                        "or {dataset: NAME, k: N}")] | None = Field(None, description="inline demos, or {dataset: ...}")


# -- the sandbox -------------------------------------------------------------------------------
_env = None


def jinja_env():
    """The one sandboxed Jinja2 environment prompts are rendered in."""
    global _env
    if _env is None:
        from jinja2 import StrictUndefined
        from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

        class PromptEnvironment(ImmutableSandboxedEnvironment):
            intercepted_binops = frozenset(["*", "**"])

            def call_binop(self, context, operator, left, right):
                if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                    raise SecurityError("exponent too large")
                if operator == "*":
                    for a, b in ((left, right), (right, left)):
                        if isinstance(a, (str, list, tuple)) and isinstance(b, int) and len(a) * b > MAX_RENDERED:
                            raise SecurityError("repetition too large")
                return super().call_binop(context, operator, left, right)

        _env = PromptEnvironment(undefined=StrictUndefined, autoescape=False,
                                 trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    return _env


@dataclass
class Part:
    """One role part of the body: its template text and the file line its text starts on."""

    role: str
    text: str
    line: int  # 1-based line in the file of the part's first template line
    template: "Template | None" = None


def split_body(body: str, first_line: int, where: str = "") -> list[Part]:
    """Split a body at role-marker lines. Text before the first marker is a user part."""
    parts: list[Part] = []
    role, start, buf, marker = "user", first_line, [], None

    def close() -> None:
        text = "\n".join(buf)
        if text.strip():
            parts.append(Part(role, text, start))
        elif marker is not None:
            raise UserError(f"the {role} part is empty", path=where or None, line=marker)

    for i, line in enumerate(body.split("\n")):
        m = _ROLE_LINE.match(line)
        if m:
            close()
            role, start, buf, marker = m.group(1), first_line + i + 1, [], first_line + i
        else:
            buf.append(line)
    close()
    return parts


# -- per-input demos ---------------------------------------------------------------------------
_INDEXES: "dict[tuple[str, str, str, str], Any]" = {}  # (dataset, version, split, method) -> NearestDemos
_INDEX_LOCK = threading.Lock()
MAX_INDEXES = 16


def nearest_index(dataset: str, version: str, split: str, pool: list[Example], method: str):
    """The nearest-neighbour index (`tunelab.optimize.demos.NearestDemos`) over one dataset
    version's split, built once per process: every prompt version and the optimizer share it."""
    from tunelab.optimize.demos import NearestDemos

    key = (dataset, version, split, method)
    with _INDEX_LOCK:
        index = _INDEXES.get(key)
        if index is None:
            if len(_INDEXES) >= MAX_INDEXES:
                _INDEXES.pop(next(iter(_INDEXES)))
            index = _INDEXES[key] = NearestDemos(pool, method)
        return index


class DemoSelector:
    """Per-input few-shot demos (`strategy: knn_tfidf | knn_embed`): `select(example)` gives the
    `k` examples of the dataset split nearest to the example's input, the nearest last; never an
    example whose input is the example's own. Deterministic; ties go to the earlier example.

    Not a list: code that needs the same demos for every input must call `select`."""

    def __init__(self, source: DemoSource, dataset: str, version: str, pool: list[Example],
                 index: Any = None):
        if not source.per_input:
            raise ValueError(f"strategy {source.strategy} draws its demos once; use draw_demos")
        self.source = source
        self.dataset, self.version, self.split = dataset, version, source.split
        self.strategy, self.k = source.strategy, source.k
        method = "tfidf" if source.strategy == "knn_tfidf" else "embed"
        self.index = index if index is not None else nearest_index(dataset, version, source.split, pool, method)

    @property
    def pool(self) -> list[Example]:
        return self.index.pool

    def select(self, example: Example | dict | str) -> list[Example]:
        return self.index.select(as_example(example), self.k)

    def select_many(self, examples: "list[Example]") -> list[list[Example]]:
        picks = self.index.neighbours([as_example(ex).input for ex in examples], self.k)
        return [[self.index.pool[i] for i in idx] for idx in picks]

    def to_dict(self) -> dict[str, Any]:
        """What identifies the choice (for fingerprints): strategy, dataset@version, split, k."""
        return {"strategy": self.strategy, "dataset": f"{self.dataset}@{self.version}", "split": self.split,
                "k": self.k}

    def __len__(self) -> int:  # how many demos each input gets (fewer only when the split is smaller)
        return self.k

    def __iter__(self):
        raise TypeError(f"demos {self.strategy} are chosen per input: call .select(example), not list()")

    def __repr__(self) -> str:
        return f"DemoSelector({self.strategy}, k={self.k}, {self.dataset}@{self.version}:{self.split})"


# -- the prompt --------------------------------------------------------------------------------
class Prompt:
    """A parsed prompt. Build one with `parse_prompt` or `load_prompt`; it is immutable."""

    def __init__(self, name: str, front: FrontMatter, body: str, parts: list[Part], text: str,
                 path: Path | str | None = None, workspace: "Workspace | None" = None):
        self.name = name
        self.front = front
        self.body = body
        self.parts = parts
        self.text = text  # the file's text as written (comments kept)
        self.path = path
        self.workspace = workspace
        self.version = content_hash(front, body)
        self._demo_cache: list[Example] | DemoSelector | None = None
        variables: set[str] = set()
        from jinja2 import meta

        for part in parts:
            variables |= meta.find_undeclared_variables(jinja_env().parse(part.text))
        self.variables = variables  # every top-level name the templates use

    def __repr__(self) -> str:
        return f"Prompt({self.name!r}, version={self.version!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Prompt) and (self.name, self.version) == (other.name, other.version)

    def __hash__(self) -> int:
        return hash((self.name, self.version))

    # -- front matter, as attributes -------------------------------------------------------
    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def output(self) -> OutputSpec:
        return self.front.output

    @property
    def labels(self) -> list[str] | None:
        return self.front.output.labels

    @property
    def model(self) -> str:
        """The model spec: the front matter's, else the workspace's default model."""
        if self.front.model:
            return self.front.model
        if self.workspace is not None:
            return self.workspace.config.default_model
        from tunelab.workspace import DEFAULT_MODEL

        return DEFAULT_MODEL

    @property
    def temperature(self) -> float:
        return self.front.temperature

    @property
    def max_tokens(self) -> int:
        if self.front.max_tokens is not None:
            return self.front.max_tokens
        return 16 if self.front.output.type == "label" else 256

    @property
    def description(self) -> str | None:
        return self.front.description

    @property
    def demos(self) -> list[Example] | DemoSource:
        """Inline demos as Examples, or the DemoSource they are drawn from ([] when none)."""
        d = self.front.demos
        if d is None:
            return []
        if isinstance(d, DemoSource):
            return d
        return [demo.to_example() for demo in d]

    @property
    def instruction(self) -> str:
        """The system part's text (else the first user part's), for the optimizer to vary."""
        for role in ("system", "user"):
            for part in self.parts:
                if part.role == role:
                    return part.text.strip()
        return ""

    @property
    def uses_demos_inline(self) -> bool:
        """Whether the template places the demos itself (then they are not added as turns)."""
        return "demos" in self.variables

    # -- demos -----------------------------------------------------------------------------
    def resolve_demos(self, workspace: "Workspace | None" = None) -> "list[Example] | DemoSelector":
        """The few-shot demos: a list of Examples (inline, or drawn once from a DemoSource), or
        for a per-input source (`knn_tfidf`, `knn_embed`) a `DemoSelector` whose `.select(example)`
        gives each input its demos. `render` and `request` take either."""
        d = self.demos
        if not isinstance(d, DemoSource):
            return d
        if self._demo_cache is not None and workspace in (None, self.workspace):
            return self._demo_cache if isinstance(self._demo_cache, DemoSelector) else list(self._demo_cache)
        ws = workspace or self.workspace
        if ws is None:
            raise UserError(f"prompt '{self.name}' draws its demos from dataset '{d.dataset}'; "
                            "load it through a workspace (load_prompt) or pass demos=")
        from tunelab.datasets import get_dataset

        try:
            ds = get_dataset(ws, d.dataset)
            examples = ds.split(d.split)
        except UserError as exc:  # NotFound included: name the prompt file and the field
            raise type(exc)(exc.raw_message, path=self.where, line=self._front_line(("demos",)),
                            field="demos") from None
        resolved: list[Example] | DemoSelector
        if d.per_input:
            if d.k > len(examples):
                raise UserError(f"k {d.k} is larger than the {len(examples)} examples of "
                                f"{ds.name}@{ds.version}:{d.split}", path=self.where,
                                line=self._front_line(("demos", "k")), field="demos.k")
            resolved = DemoSelector(d, ds.name, ds.version, examples)
        else:
            resolved = draw_demos(examples, d.k, d.strategy, d.seed)
        if ws is self.workspace:
            self._demo_cache = resolved
        return resolved if isinstance(resolved, DemoSelector) else list(resolved)

    def _front_line(self, loc: tuple) -> int | None:
        """The file line of a front-matter key (for errors found after parsing)."""
        lines = self.text.replace("\r\n", "\n").split("\n")
        if not lines or not _FENCE.match(lines[0].lstrip("\ufeff")):
            return None
        end = next((i for i in range(1, len(lines)) if _FENCE.match(lines[i])), None)
        return None if end is None else _yaml_line("\n".join(lines[1:end]), loc)

    # -- rendering ------------------------------------------------------------------------
    def variables_for(self, example: Example | dict | str, demos: list[Example]) -> dict[str, Any]:
        ex = as_example(example)
        values = dict(ex.meta)
        values.pop("output", None)
        values["input"] = ex.input
        values["labels"] = list(self.labels or [])
        schema = self.output.schema
        values["schema"] = json.dumps(schema, ensure_ascii=False, indent=2) if schema is not None else ""
        values["demos"] = [d.fields() for d in demos]
        return values

    def render(self, example: Example | dict | str,
               demos: "list[Example] | DemoSelector | None" = None) -> list[Message]:
        """The chat messages for `example`. `demos=None` uses the prompt's own demos; a
        `DemoSelector` chooses the demos for this example."""
        if demos is None:
            demos = self.resolve_demos()
        if isinstance(demos, DemoSelector):
            demos = demos.select(as_example(example))
        demos = [as_example(d) for d in demos]
        values = self.variables_for(example, demos)
        messages = [{"role": p.role, "content": self._render_part(p, values)} for p in self.parts]
        if demos and not self.uses_demos_inline:
            last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
            if last_user is None:
                raise UserError("few-shot demos need a user part to render them with", path=self.where)
            template_part = self.parts[last_user]
            turns: list[Message] = []
            for i, demo in enumerate(demos):
                demo_values = self.variables_for(demo, [])
                try:
                    content = self._render_part(template_part, demo_values)
                except UserError as exc:
                    raise UserError(f"{exc.raw_message} (while rendering few-shot demo {i + 1})",
                                    path=exc.path, line=exc.line) from None
                turns.append({"role": "user", "content": content})
                turns.append({"role": "assistant", "content": demo.output})
            messages[last_user:last_user] = turns
        return messages

    def request(self, example: Example | dict | str, demos: "list[Example] | DemoSelector | None" = None,
                **overrides: Any) -> Request:
        """The model request for `example`: messages plus labels / json_schema / limits."""
        params: dict[str, Any] = {
            "messages": self.render(example, demos),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "labels": list(self.labels) if self.output.type == "label" else None,
            "json_schema": self.output.schema if self.output.type == "json" else None,
        }
        params.update(overrides)
        return Request(**params)

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else self.name

    def _render_part(self, part: Part, values: dict[str, Any]) -> str:
        from jinja2 import TemplateError, UndefinedError
        from jinja2.sandbox import SecurityError

        if part.template is None:
            part.template = compile_part(part, self.where)
        try:
            return part.template.render(values).strip()
        except SecurityError as exc:
            raise UserError(f"unsafe template: {exc}", path=self.where, line=_template_line(exc, part)) from None
        except UndefinedError as exc:
            raise UserError(f"undefined variable: {_undefined_message(exc, values)}",
                            path=self.where, line=_template_line(exc, part)) from None
        except TemplateError as exc:
            raise UserError(f"template error: {exc}", path=self.where, line=_template_line(exc, part)) from None
        except (TypeError, ValueError, ArithmeticError, LookupError, OverflowError) as exc:
            raise UserError(f"template error: {type(exc).__name__}: {exc}", path=self.where,
                            line=_template_line(exc, part)) from None

    # -- changing and writing ---------------------------------------------------------------
    def front_matter_dict(self) -> dict[str, Any]:
        """The front matter as plain data, defaults left out (the canonical form)."""
        return canonical_front_matter(self.front)

    def to_text(self) -> str:
        """The file text. Unchanged prompts give back their text as written."""
        return self.text

    def replace(self, **changes: Any) -> "Prompt":
        """A copy with changes: `body`, `instruction`, `demos` (Examples, dicts, a DemoSource or
        None), `name`, or any front-matter field (`model`, `temperature`, `max_tokens`,
        `output`, `description`)."""
        name = changes.pop("name", self.name)
        body = changes.pop("body", None)
        instruction = changes.pop("instruction", None)
        data = self.front_matter_dict()
        if "demos" in changes:
            demos = changes.pop("demos")
            data.pop("demos", None)
            if demos is not None and not (isinstance(demos, list) and not demos):
                data["demos"] = demos_data(demos)
        for key, value in changes.items():
            if key not in FrontMatter.model_fields:
                raise UserError(f"unknown prompt field '{key}' (fields: body, instruction, name, "
                                f"{', '.join(FrontMatter.model_fields)})")
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="json", by_alias=True, exclude_none=True)
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        if body is None:
            if instruction is not None:
                parts = [Part(p.role, p.text, p.line) for p in self.parts]
                system = next((p for p in parts if p.role == "system"), None)
                if system is None:
                    parts.insert(0, Part("system", instruction, 0))
                else:
                    system.text = instruction
                body = join_parts(parts)
            else:
                body = self.body
        elif instruction is not None:
            raise UserError("replace() takes body= or instruction=, not both")
        text = format_prompt(data, body)
        return parse_prompt(text, name, path=self.path if name == self.name else None, workspace=self.workspace)


# -- parsing -----------------------------------------------------------------------------------
def parse_prompt(text: str, name: str, path: Path | str | None = None,
                 workspace: "Workspace | None" = None) -> Prompt:
    """Parse and validate a prompt file's text. Every problem is a UserError naming the file
    (`path`, else `name`), the line and the field where there is one."""
    where = str(path) if path is not None else name
    if text.startswith("\ufeff"):
        text = text[1:]
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    data: Any = {}
    body_start = 0  # index into lines of the body's first line
    front_text = ""
    if lines and _FENCE.match(lines[0]):
        end = next((i for i in range(1, len(lines)) if _FENCE.match(lines[i])), None)
        if end is None:
            raise UserError("front matter is not closed: expected a line '---' after the settings",
                            path=where, line=1)
        front_text = "\n".join(lines[1:end])
        body_start = end + 1
        try:
            data = yaml.safe_load(front_text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            problem = getattr(exc, "problem", None) or str(exc).split("\n")[0]
            context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
            if context and cmark is not None and mark is not None and cmark.line != mark.line:
                problem += f" ({context} that starts on line {cmark.line + 2})"
            raise UserError(f"YAML error in front matter: {problem}", path=where,
                            line=None if mark is None else mark.line + 2) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UserError("front matter must be a mapping of settings (key: value)", path=where, line=2)
    try:
        front = FrontMatter.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        if len(loc) >= 2 and loc[0] == "demos" and loc[1] in ("inline", "dataset"):
            loc = loc[:1] + loc[2:]
        line = _yaml_line(front_text, loc)
        field = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            known = _known_keys(loc)
            hint = _suggest(str(loc[-1]), known)
            msg = f"unknown key '{field}'" + (f" (did you mean '{hint}'?)" if hint else
                                               f" (known keys: {', '.join(known)})" if known else "")
            raise UserError(msg, path=where, line=line) from None
        msg = err["msg"].removeprefix("Value error, ")
        more = len(exc.errors()) - 1
        raise UserError(msg + (f" (and {more} more problem{'s' * (more > 1)})" if more else ""),
                        path=where, line=line, field=field or None) from None
    body = "\n".join(lines[body_start:])
    parts = split_body(body, first_line=body_start + 1, where=where)
    if not parts:
        raise UserError("the prompt has no body: write the user message (e.g. '{{ input }}') "
                        "after the front matter", path=where)
    for part in parts:
        part.template = compile_part(part, where)
    if not any(p.role == "user" for p in parts):
        raise UserError("the prompt has no user part (a line 'user:' followed by the message)", path=where)
    return Prompt(name, front, body, parts, text, path=path, workspace=workspace)


def compile_part(part: Part, where: str) -> "Template":
    """Compile one part's template; syntax errors and unsafe attribute names name the file line."""
    from jinja2 import TemplateSyntaxError, nodes

    env = jinja_env()
    try:
        ast = env.parse(part.text)
    except TemplateSyntaxError as exc:
        raise UserError(f"template syntax error: {exc.message}", path=where,
                        line=part.line + (exc.lineno or 1) - 1) from None
    # the sandbox refuses these at render time too; finding them here makes `check` catch them
    # even inside branches the sample input does not take
    unsafe: list[tuple[int, str]] = []
    for node in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        name = None
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            name = node.arg.value
        elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args and \
                isinstance(node.args[0], nodes.Const):
            name = node.args[0].value
        if isinstance(name, str) and name.startswith("_"):
            unsafe.append((node.lineno, name))
    if unsafe:
        unsafe.reverse()  # find_all goes outside-in: a.__b__.__c__ yields __c__ first
        names = ", ".join(dict.fromkeys(f"'{n}'" for _, n in sorted(unsafe, key=lambda u: u[0])))
        raise UserError(f"unsafe template: access to attribute {names} is not allowed "
                        "(names starting with '_' are off limits in the sandbox)",
                        path=where, line=part.line + min(unsafe)[0] - 1)
    try:
        return env.from_string(part.text)
    except TemplateSyntaxError as exc:
        raise UserError(f"template syntax error: {exc.message}", path=where,
                        line=part.line + (exc.lineno or 1) - 1) from None


def _template_line(exc: BaseException, part: Part) -> int | None:
    """The file line of a render-time error, from the template frames in its traceback."""
    lineno = None
    for frame, tb_lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == "<template>":
            lineno = tb_lineno
    return None if lineno is None else part.line + lineno - 1


def _undefined_message(exc: BaseException, values: dict[str, Any]) -> str:
    msg = str(exc)
    m = re.match(r"^'([^']+)' is undefined$", msg)
    if m:
        name = m.group(1)
        have = ", ".join(sorted(values))
        hint = " (the expected output is only visible to demos)" if name == "output" else ""
        return f"'{name}'{hint}; the example has: {have}"
    return msg


def _yaml_line(front_text: str, loc: tuple) -> int | None:
    """The file line of the key at `loc` in the front matter (line 1 of the file is '---')."""
    try:
        node = yaml.compose(front_text)
    except yaml.YAMLError:
        return None
    line = 2 if node is None else node.start_mark.line + 2
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(key):
                    line, node = k.start_mark.line + 2, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 2
        else:
            return line
    return line


def _known_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = FrontMatter
    if len(loc) >= 2 and loc[0] == "output":
        model = OutputSpec
    elif len(loc) >= 2 and loc[0] == "demos" and not isinstance(loc[1], int):
        model = DemoSource
    elif len(loc) >= 2 and loc[0] == "demos":
        return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _suggest(word: str, known: list[str]) -> str | None:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return close[0] if close else None


# -- canonical content and formatting ------------------------------------------------------------
def canonical_front_matter(front: FrontMatter) -> dict[str, Any]:
    data = front.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    if "output" in data:
        data["output"] = {k: v for k, v in data["output"].items() if v is not None}
        data["output"].setdefault("type", front.output.type)
        if data["output"] == {"type": "text"}:
            del data["output"]
    return data


def canonical_body(body: str) -> str:
    body = body.replace("\r\n", "\n").strip("\n")
    return "\n".join(line.rstrip() for line in body.split("\n")).rstrip() + "\n"


def content_hash(front: FrontMatter, body: str) -> str:
    """The version of a prompt: sha256 of its canonical front matter JSON and body (12 hex)."""
    head = json.dumps(canonical_front_matter(front), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256((head + "\n---\n" + canonical_body(body)).encode("utf-8")).hexdigest()[:12]


_ORDER = ("description", "model", "temperature", "max_tokens", "output", "demos")


def format_prompt(front: dict[str, Any], body: str) -> str:
    """The file text for front matter data and a body."""
    ordered = {k: front[k] for k in _ORDER if k in front}
    ordered.update({k: v for k, v in front.items() if k not in ordered})
    head = yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, default_flow_style=None,
                          width=100) if ordered else ""
    return f"---\n{head}---\n{canonical_body(body)}"


def join_parts(parts: list[Part]) -> str:
    return "\n".join(f"{p.role}:\n{p.text.strip(chr(10))}\n" for p in parts)


def demos_data(demos: Any) -> Any:
    """Front-matter data for demos given as Examples, dicts, a DemoSource or a dict."""
    if isinstance(demos, DemoSource):
        return demos.model_dump(mode="json")
    if isinstance(demos, dict):
        return demos
    out = []
    for d in demos:
        if isinstance(d, Example):
            item = {k: v for k, v in d.meta.items() if k not in ("input", "output")}
            item.update({"input": d.input, "output": d.output})
            out.append(item)
        elif isinstance(d, Demo):
            out.append(d.model_dump(mode="json"))
        else:
            out.append(dict(d))
    return out


def as_example(value: Example | dict | str) -> Example:
    if isinstance(value, Example):
        return value
    if isinstance(value, str):
        return Example(input=value, output="")
    if isinstance(value, dict):
        if "input" not in value:
            raise UserError("an example needs an 'input' field")
        rest = {k: v for k, v in value.items() if k not in ("input", "output", "meta")}
        rest.update(value.get("meta") or {})
        return Example(input=str(value["input"]), output=str(value.get("output", "")), meta=rest)
    raise TypeError(f"not an example: {value!r}")


def draw_demos(examples: list[Example], k: int, strategy: str = "random", seed: int = 0) -> list[Example]:
    """k demos from `examples`: at random, or stratified (labels in turn, each shuffled)."""
    rng = random.Random(seed)
    if k <= 0 or not examples:
        return []
    if strategy == "stratified":
        groups: dict[str, list[Example]] = defaultdict(list)
        for ex in examples:
            groups[ex.output].append(ex)
        order = sorted(groups)
        rng.shuffle(order)
        for key in order:
            rng.shuffle(groups[key])
        out: list[Example] = []
        while len(out) < k and any(groups.values()):
            for key in order:
                if groups[key] and len(out) < k:
                    out.append(groups[key].pop())
        return out
    return rng.sample(examples, min(k, len(examples)))


# -- the working file and the store ----------------------------------------------------------
def prompt_path(ws: "Workspace", name: str) -> Path:
    return ws.prompts_dir / f"{name}{SUFFIX}"


def parse_ref(ref: str) -> tuple[str, str | None]:
    """`NAME[@VERSION|@LABEL]` -> (name, version-or-label)."""
    name, _, at = ref.partition("@")
    return name, (at or None)


def read_prompt_file(path: Path | str, name: str | None = None, workspace: "Workspace | None" = None) -> Prompt:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound("prompt file not found", path=path) from None
    except IsADirectoryError:
        raise UserError("is a folder, not a prompt file", path=path) from None
    except UnicodeDecodeError:
        raise UserError("is not UTF-8 text", path=path) from None
    return parse_prompt(text, name or path.name.removesuffix(SUFFIX), path=_display_path(path, workspace),
                        workspace=workspace)


def _display_path(path: Path, ws: "Workspace | None") -> str:
    if ws is not None:
        try:
            return str(path.resolve().relative_to(ws.root))
        except ValueError:
            pass
    return str(path)


def load_prompt(ws: "Workspace", ref: str) -> Prompt:
    """The prompt `NAME` (the working file), `NAME@VERSION`, `NAME@LABEL` or `NAME@current`.
    A path to a `.prompt` file is read as it is."""
    if ref.endswith(SUFFIX) and "@" not in ref:
        return read_prompt_file(Path(ref), workspace=ws)
    name, at = parse_ref(ref)
    validate_name(name, "prompt")
    if at is None:
        path = prompt_path(ws, name)
        if path.is_file():
            return read_prompt_file(path, name, workspace=ws)
        current = current_version(ws, name)
        if current is None:
            raise NotFound(f"unknown prompt '{name}': no file {_display_path(path, ws)} and no committed "
                           f"versions (prompts: {', '.join(list_prompt_names(ws)) or 'none'})")
        at = current
    version = resolve_version(ws, name, at)
    from sqlalchemy import select

    from tunelab.store.models import PromptVersionRow

    with ws.store.session() as s:
        row = s.scalar(select(PromptVersionRow).where(PromptVersionRow.name == name,
                                                      PromptVersionRow.version == version))
    if row is None:
        raise NotFound(f"prompt '{name}' has no version '{version}'")
    return parse_prompt(row.content, name, path=f"{name}@{version}", workspace=ws)


# -- versions ----------------------------------------------------------------------------------
RESERVED_LABELS = {"current", "working"}


@dataclass
class Commit:
    """One entry of a prompt's history."""

    name: str
    version: str
    parent: str | None
    message: str
    author: str
    created_at: datetime
    meta: dict[str, Any]
    labels: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "parent": self.parent, "message": self.message,
                "author": self.author, "created_at": self.created_at.isoformat(timespec="seconds"),
                "meta": self.meta, "labels": self.labels}


def _rows(ws: "Workspace", model, name: str | None = None, order=None):
    from sqlalchemy import select

    with ws.store.session() as s:
        q = select(model)
        if name is not None:
            q = q.where(model.name == name)
        if order is not None:
            q = q.order_by(*order)
        return list(s.scalars(q))


def current_version(ws: "Workspace", name: str) -> str | None:
    """The version of the newest commit of `name` (None when it has none)."""
    from tunelab.store.models import PromptCommitRow

    rows = _rows(ws, PromptCommitRow, name, order=(PromptCommitRow.id.desc(),))
    return rows[0].version if rows else None


def prompt_labels(ws: "Workspace", name: str) -> dict[str, str]:
    """label -> version for `name`."""
    from tunelab.store.models import PromptLabelRow

    return {r.label: r.version for r in _rows(ws, PromptLabelRow, name, order=(PromptLabelRow.label,))}


def prompt_versions(ws: "Workspace", name: str) -> list[str]:
    from tunelab.store.models import PromptVersionRow

    return [r.version for r in _rows(ws, PromptVersionRow, name, order=(PromptVersionRow.id,))]


def resolve_version(ws: "Workspace", name: str, at: str) -> str:
    """The full version `at` names: `current`, a label, or a unique prefix of a version."""
    if at == "current":
        version = current_version(ws, name)
        if version is None:
            raise NotFound(f"prompt '{name}' has no commits yet (use: tunelab prompt commit {name} -m MESSAGE)")
        return version
    labels = prompt_labels(ws, name)
    if at in labels:
        return labels[at]
    versions = prompt_versions(ws, name)
    matches = [v for v in versions if v.startswith(at.lower())] if re.fullmatch(r"[0-9a-fA-F]{4,64}", at) else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UserError(f"version '{at}' of prompt '{name}' is ambiguous: {', '.join(matches)}")
    if not versions:
        raise NotFound(f"prompt '{name}' has no committed versions")
    known = ", ".join(["current", *labels]) if labels else "current"
    raise NotFound(f"prompt '{name}' has no version or label '{at}' (labels: {known}; "
                   f"see: tunelab prompt log {name})")


def list_prompt_names(ws: "Workspace") -> list[str]:
    from tunelab.store.models import PromptVersionRow

    names = {p.name.removesuffix(SUFFIX) for p in ws.prompts_dir.glob(f"*{SUFFIX}")} if ws.prompts_dir.is_dir() else set()
    names |= {r.name for r in _rows(ws, PromptVersionRow)}
    return sorted(names)


def default_author(ws: "Workspace") -> str:
    """tunelab.yaml `author`, else $USER, else git's user.name."""
    if ws.config.author:
        return ws.config.author
    for var in ("TUNELAB_AUTHOR", "USER", "USERNAME"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        out = subprocess.run(["git", "config", "user.name"], capture_output=True, text=True, timeout=5,
                             cwd=ws.root).stdout.strip()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name is not an error
        return "unknown"


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _record(ws: "Workspace", prompt: Prompt, message: str, author: str | None, meta: dict | None,
            parent: str | None) -> None:
    from sqlalchemy import select

    from tunelab.store.models import PromptCommitRow, PromptVersionRow

    with ws.store.session() as s:
        exists = s.scalar(select(PromptVersionRow.id).where(PromptVersionRow.name == prompt.name,
                                                            PromptVersionRow.version == prompt.version))
        if exists is None:
            s.add(PromptVersionRow(name=prompt.name, version=prompt.version, content=prompt.to_text()))
        s.add(PromptCommitRow(name=prompt.name, version=prompt.version, parent=parent, message=message,
                              author=author or default_author(ws), meta=dict(meta or {})))


def commit_prompt(ws: "Workspace", name: str, message: str, author: str | None = None,
                  meta: dict | None = None, text: str | None = None, write_file: bool | None = None) -> str:
    """Record a new version of prompt `name` and make it current; returns the version.

    `text` defaults to the working file. With `text` given (an optimizer's result), the working
    file is updated too when it is missing or has no uncommitted changes (`write_file=None`), or
    as `write_file` says. Committing the current version again is an error ("nothing to commit").
    """
    validate_name(name, "prompt")
    path = prompt_path(ws, name)
    if text is None:
        prompt = read_prompt_file(path, name, workspace=ws)
    else:
        prompt = parse_prompt(text, name, path=f"{name} (new version)", workspace=ws)
    if not (message or "").strip():
        raise UserError("a commit needs a message (-m MESSAGE)")
    current = current_version(ws, name)
    if prompt.version == current:
        raise UserError(f"nothing to commit: prompt '{name}' is version {current}, already current")
    if text is not None:
        if write_file is None:
            write_file = not path.exists() or (current is not None and _file_version(ws, name) == current)
        if write_file:
            write_text_atomic(path, prompt.to_text())
    _record(ws, prompt, message.strip(), author, meta, parent=current)
    return prompt.version


def _file_version(ws: "Workspace", name: str) -> str | None:
    path = prompt_path(ws, name)
    if not path.is_file():
        return None
    try:
        return read_prompt_file(path, name, workspace=ws).version
    except UserError:
        return "invalid"


def prompt_log(ws: "Workspace", name: str) -> list[Commit]:
    """The commits of `name`, newest first, with the labels pointing at each version."""
    from tunelab.store.models import PromptCommitRow

    rows = _rows(ws, PromptCommitRow, name, order=(PromptCommitRow.id.desc(),))
    if not rows and not prompt_path(ws, name).is_file():
        raise NotFound(f"unknown prompt '{name}' (prompts: {', '.join(list_prompt_names(ws)) or 'none'})")
    by_version: dict[str, list[str]] = defaultdict(list)
    for label, version in prompt_labels(ws, name).items():
        by_version[version].append(label)
    return [Commit(r.name, r.version, r.parent, r.message, r.author, r.created_at, dict(r.meta or {}),
                   sorted(by_version.get(r.version, []))) for r in rows]


def tag_prompt(ws: "Workspace", ref: str, label: str) -> str:
    """Point `label` (e.g. `production`) at the version `ref` names; returns the version."""
    from tunelab.store.models import PromptLabelRow

    name, at = parse_ref(ref)
    validate_name(name, "prompt")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.\-]{0,99}", label or ""):
        raise UserError(f"invalid label '{label}': start with a letter; use letters, digits, '-', '_', '.'")
    if label in RESERVED_LABELS:
        raise UserError(f"'{label}' is reserved and cannot be a label")
    if at is None:
        version = _file_version(ws, name)
        if version is None or version not in prompt_versions(ws, name):
            raise UserError(f"the working file of prompt '{name}' is not committed; commit it first "
                            f"or tag a committed version (NAME@VERSION)")
    else:
        version = resolve_version(ws, name, at)
    with ws.store.session() as s:
        row = s.get(PromptLabelRow, (name, label))
        if row is None:
            s.add(PromptLabelRow(name=name, label=label, version=version))
        else:
            row.version = version
    return version


def show_prompt(ws: "Workspace", ref: str) -> str:
    """The text of the prompt `ref` names (the working file for a plain name)."""
    return load_prompt(ws, ref).to_text()


def diff_prompts(ws: "Workspace", a: str, b: str | None = None) -> str:
    """A unified diff between two references (default: `NAME@current` vs the working file).
    With one plain name, `a` becomes `NAME@current` and `b` the working file."""
    if b is None:
        name, at = parse_ref(a)
        a, b = (f"{name}@current", name) if at is None else (a, name)
    pa, pb = load_prompt(ws, a), load_prompt(ws, b)
    label_a = a if "@" in a else f"{a} (working file)"
    label_b = b if "@" in b else f"{b} (working file)"
    lines = difflib.unified_diff(pa.to_text().splitlines(keepends=True), pb.to_text().splitlines(keepends=True),
                                 fromfile=f"{label_a} {pa.version}", tofile=f"{label_b} {pb.version}")
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def rollback_prompt(ws: "Workspace", name: str, version: str, author: str | None = None,
                    force: bool = False) -> str | None:
    """Make an old version current again: write it into the working file and record a commit
    "rollback to VERSION" whose parent is the current version. Refuses to overwrite uncommitted
    changes in the working file unless `force`. Returns the version, or None when it was already
    current (then only the working file is restored)."""
    validate_name(name, "prompt")
    target = resolve_version(ws, name, version)
    prompt = load_prompt(ws, f"{name}@{target}")
    current = current_version(ws, name)
    file_version = _file_version(ws, name)
    if not force and file_version is not None and file_version not in (current, target):
        raise UserError(f"prompts/{name}{SUFFIX} has uncommitted changes (version {file_version}); commit "
                        "them first or pass --force to discard them")
    if file_version != target:
        write_text_atomic(prompt_path(ws, name), prompt.to_text())
    if target == current:
        return None
    _record(ws, prompt, f"rollback to {target}", author, {"rollback_of": current}, parent=current)
    return target


@dataclass
class PromptSummary:
    name: str
    current: str | None
    file_version: str | None  # None: no working file; "invalid": it does not parse
    labels: dict[str, str]
    commits: int

    @property
    def status(self) -> str:
        if self.file_version is None:
            return "no file"
        if self.file_version == "invalid":
            return "invalid"
        if self.current is None:
            return "uncommitted"
        return "clean" if self.file_version == self.current else "modified"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "current": self.current, "file_version": self.file_version,
                "labels": self.labels, "commits": self.commits, "status": self.status}


def list_prompts(ws: "Workspace") -> list[PromptSummary]:
    """Every prompt of the workspace: working files and committed ones."""
    from tunelab.store.models import PromptCommitRow

    counts: dict[str, int] = defaultdict(int)
    for r in _rows(ws, PromptCommitRow):
        counts[r.name] += 1
    return [PromptSummary(n, current_version(ws, n), _file_version(ws, n), prompt_labels(ws, n), counts[n])
            for n in list_prompt_names(ws)]


SAMPLE_INPUT = "This is a sample input."


def check_prompt(ws: "Workspace | None", path_or_ref: str, sample: Example | str | None = None,
                 data: str | None = None) -> tuple[Prompt, list[Message], Example]:
    """Validate a prompt and render it against a sample: `sample`, else the first example of
    dataset `data` (`NAME[@VER][:SPLIT]`, default split train), else a placeholder input.
    Returns (prompt, messages, the example used)."""
    path = Path(path_or_ref)
    if path.suffix == SUFFIX or path.is_file() or ws is None:
        prompt = read_prompt_file(path, workspace=ws)
    else:
        prompt = load_prompt(ws, path_or_ref)
    if sample is not None:
        example = as_example(sample)
    elif data is not None:
        if ws is None:
            raise UserError("--data needs a workspace")
        from tunelab.datasets import get_split

        _, _, examples = get_split(ws, data, default_split="train")
        if not examples:
            raise UserError(f"dataset split '{data}' is empty")
        example = examples[0]
    else:
        example = Example(input=SAMPLE_INPUT, output="")
    if isinstance(prompt.demos, DemoSource) and ws is not None:
        demos = prompt.resolve_demos(ws)
    else:
        demos = None
    try:
        messages = prompt.render(example, demos=demos)
    except UserError as exc:
        if sample is None and data is None and exc.raw_message.startswith("undefined variable"):
            raise UserError(exc.raw_message + " (rendered with a placeholder input; pass --data DATASET "
                            "or --field KEY=VALUE to render with an example that has more fields)",
                            path=exc.path, line=exc.line) from None
        raise
    return prompt, messages, example


def run_prompt(ws: "Workspace | None", ref: str, example: Example | str, model: str | None = None,
               precision: str | None = None) -> dict[str, Any]:
    """Render `example` with the prompt `ref` and answer it with `model` (default: the prompt's):
    the playground behind `tunelab run`. Returns output, tokens, latency and, for label outputs,
    the probability of each label (normalized over the labels)."""
    import math

    from tunelab.models import load_model

    path = Path(ref)
    if ws is None or (path.suffix == SUFFIX and "@" not in ref):
        prompt = read_prompt_file(path, workspace=ws)
    else:
        prompt = load_prompt(ws, ref)
    if precision is not None and precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"--precision must be auto, bf16 or fp32 (got '{precision}')")
    spec = model or prompt.model
    options = {"precision": precision} if precision is not None else {}
    backend = load_model(spec, ws, **options)
    request = prompt.request(example, demos=prompt.resolve_demos(ws) if ws is not None else None)
    (completion,) = backend.complete([request])
    result: dict[str, Any] = {
        "prompt": prompt.ref, "model": getattr(backend, "name", spec), "output": completion.text,
        "prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
        "latency_s": completion.latency_s, "messages": request.messages,
    }
    if completion.label_logprobs:
        top = max(completion.label_logprobs.values())
        weights = {k: math.exp(v - top) for k, v in completion.label_logprobs.items()}
        total = sum(weights.values()) or 1.0
        result["label_probs"] = {k: w / total for k, w in weights.items()}
    if prompt.output.type == "json":
        try:
            result["json"] = json.loads(completion.text)
            result["json_valid"] = True
        except ValueError:
            result["json_valid"] = False
    return result
