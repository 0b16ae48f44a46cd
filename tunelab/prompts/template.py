"""A prompt: its template body, rendered in a sandbox into the chat messages of a request.

A prompt file is YAML front matter (`tunelab.prompts.spec`) and a body:

    ---
    output: {type: label, labels: [spam, ham]}
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
so `{% for %}` loops do not leave blank lines; each rendered part is stripped. Few-shot demos
become user/assistant turns placed after the system part and before the final user turn, unless
the template uses `demos` itself.

Demos drawn from a dataset split (`demos: {dataset: NAME[@VERSION], split, k, strategy, seed}`)
are chosen as `tunelab.demos` says (random, stratified, or per input: knn_tfidf, knn_embed). A
dataset without a version means its newest version. A missing dataset or split, or `k` larger than
the split, is an error naming the prompt file and the field `demos`. `Prompt.resolve_demos(ws)`
gives a list of Examples for inline and drawn demos, and a `DemoSelector` for per-input ones;
`render` and `request` take either.
"""

from __future__ import annotations

import json
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

from tunelab.datasets import Example, get_dataset
from tunelab.demos import DemoSelector, draw
from tunelab.errors import UserError, known_keys, pydantic_error_text
from tunelab.models.base import Message, Request
from tunelab.prompts.sandbox import MAX_RENDERED, Placeholder, RenderLimit, jinja_env, render_limits
from tunelab.prompts.spec import (FENCE, Demo, DemoSource, FrontMatter, OutputSpec, canonical_front_matter,
                                  content_hash, format_prompt, yaml_line)
from tunelab.workspace import DEFAULT_MODEL

if TYPE_CHECKING:
    from jinja2 import Template

    from tunelab.workspace import Workspace

ROLES = ("system", "user", "assistant")
_ROLE_LINE = re.compile(r"^(system|user|assistant):[ \t]*$")
SAMPLE_INPUT = "This is a sample input."

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
            resolved = DemoSelector(d.strategy, d.k, ds.name, ds.version, d.split, examples)
        else:
            resolved = draw(examples, d.k, d.strategy, d.seed)
        if ws is self.workspace:
            self._demo_cache = resolved
        return resolved if isinstance(resolved, DemoSelector) else list(resolved)

    def _front_line(self, loc: tuple) -> int | None:
        """The file line of a front-matter key (for errors found after parsing)."""
        lines = self.text.replace("\r\n", "\n").split("\n")
        if not lines or not FENCE.match(lines[0].lstrip("\ufeff")):
            return None
        end = next((i for i in range(1, len(lines)) if FENCE.match(lines[i])), None)
        return None if end is None else yaml_line("\n".join(lines[1:end]), loc)

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
        `DemoSelector` chooses the demos for this example (before the render's time limit, which is
        for template code: building a nearest-neighbour index is not)."""
        if demos is None:
            demos = self.resolve_demos()
        if isinstance(demos, DemoSelector):
            demos = demos.select(as_example(example))
        with render_limits():
            return self._render(example, demos)

    def _render(self, example: Example | dict | str,
                demos: "list[Example] | DemoSelector | None" = None) -> list[Message]:
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
            "constrained": self.output.constrained,
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
            out: list[str] = []
            size = 0
            for chunk in part.template.generate(values):
                size += len(chunk)
                if size > MAX_RENDERED:
                    raise RenderLimit(f"the rendered {part.role} part is over {MAX_RENDERED:,} characters")
                out.append(chunk)
            return "".join(out).strip()
        except RenderLimit as exc:
            raise UserError(f"template too large or too slow: {exc}", path=self.where,
                            line=_template_line(exc, part)) from None
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

    def check_renders(self, workspace: "Workspace | None" = None) -> list[Message]:
        """Render with a sample input (every other field the template uses set to a placeholder)
        and its demos; a template that cannot render is a UserError naming the file and line."""
        extra = self.variables - {"input", "labels", "schema", "demos", "output", "loop", "range", "namespace",
                                  "dict", "lipsum", "cycler", "joiner"}
        sample = Example(input=SAMPLE_INPUT, output="", meta={name: Placeholder(name) for name in sorted(extra)})
        try:
            return self.render(sample, demos=self.resolve_demos(workspace))
        except UserError as exc:
            note = f" (fields {', '.join(sorted(extra))} set to placeholders)" if extra else ""
            raise UserError(f"the template does not render with a sample input{note}: {exc.raw_message}",
                            path=exc.path, line=exc.line, field=exc.field) from None

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
    if lines and FENCE.match(lines[0]):
        end = next((i for i in range(1, len(lines)) if FENCE.match(lines[i])), None)
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
        line = yaml_line(front_text, loc)
        model: type[BaseModel] = FrontMatter
        if len(loc) >= 2 and loc[0] == "output":
            model = OutputSpec
        elif len(loc) >= 2 and loc[0] == "demos":
            model = DemoSource
        err = {**err, "loc": loc}
        if err["type"] == "extra_forbidden":
            raise UserError(pydantic_error_text(err, known=known_keys(model)), path=where, line=line) from None
        more = len(exc.errors()) - 1
        raise UserError(pydantic_error_text(err) + (f" (and {more} more problem{'s' * (more > 1)})" if more else ""),
                        path=where, line=line) from None
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
