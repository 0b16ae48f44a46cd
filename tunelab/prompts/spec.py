"""The front matter of a prompt file: the typed settings above its template.

    ---
    model: smollm2-135m          # optional: default the workspace's default_model
    temperature: 0
    max_tokens: 16               # default 16 for label outputs, 256 otherwise
    output: {type: label, labels: [spam, ham]}   # or {type: json, schema: {...}, constrained: true}, or text
    # output: {type: text, judge: {rubric: "every fact stated, nothing invented", scale: [1, 5]}}
    demos:                       # few-shot demos: inline ...
      - {input: "WIN a prize", output: spam}
    # demos: {dataset: sms, split: train, k: 4, strategy: stratified, seed: 0}   # ... or drawn
    # demos: {dataset: sms@3f2a9c81d0e4, split: train, k: 4, strategy: knn_tfidf}  # ... or per input
    description: free text
    ---

Unknown keys are errors that name the closest known key. A prompt version is the sha256 of the
canonical front matter JSON plus the body (`content_hash`, 12 hex digits): the same content gets
the same version on any machine. `OutputSpec` is also what metrics and the evaluator read to know
what an answer must be (`OutputSpec.of` takes a spec, its dict or None).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from tunelab.datasets import Example
from tunelab.demos import PER_INPUT

FENCE = re.compile(r"^---[ \t]*$")

# -- front matter ------------------------------------------------------------------------------
class JudgeRubric(BaseModel):
    """How an LLM judge grades this prompt's answers (`--metric judge`): the rubric and its scale."""

    model_config = ConfigDict(extra="forbid")
    rubric: str = Field(description="what a good answer is, e.g. faithfulness (every input fact stated, nothing "
                                    "invented), format, style")
    scale: tuple[int, int] = Field(description="lowest and highest grade, e.g. [1, 5]")
    model: str | None = Field(None, description="the judge model (default: tunelab.yaml's judge.model, else the "
                                                "default model)")

    @field_validator("rubric")
    @classmethod
    def _rubric(cls, rubric: str) -> str:
        if not rubric.strip():
            raise ValueError("the rubric is empty: say what a good answer is")
        return rubric

    @field_validator("scale")
    @classmethod
    def _scale(cls, scale: tuple[int, int]) -> tuple[int, int]:
        if scale[1] <= scale[0]:
            raise ValueError(f"the high end of the scale must be above the low end (got {list(scale)})")
        if scale[1] - scale[0] > 100:
            raise ValueError(f"at most 101 grades (got {list(scale)})")
        return scale


# The metrics an output may be judged by (`output.metric`): quality metrics of its type, not the
# diagnostics beside them (format validity, length ratio, copy rate)
JUDGED_BY = {"label": ("accuracy", "macro_f1"),
             "json": ("field_f1", "json_match", "field_precision", "field_recall"),
             "text": ("chrf", "bleu", "rouge_l", "semantic", "exact_match")}


class OutputSpec(BaseModel):
    """What the model must answer: one of `labels`, JSON (optionally matching `schema`), or text."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["label", "json", "text"] = Field("text", description="label, json or text")
    labels: list[str] | None = Field(None, description="type label: the allowed answers")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="type json: a JSON Schema")
    constrained: bool = Field(False, description="type json: decode under the grammar of the schema (any JSON "
                                                 "without one), on backends that can (local, llamacpp)")
    judge: JudgeRubric | None = Field(None, description="the LLM judge's rubric and scale for these answers")
    metric: str | None = Field(None, description="the metric these answers are judged by: what comparisons, the "
                                                 "optimizer, early stopping, a fine-tune search and the hybrid's tuning "
                                                 "maximize (default by type: label accuracy, json field_f1, text chrf; "
                                                 "macro_f1 for labels where one label dominates)")

    @property
    def schema(self) -> dict[str, Any] | None:  # type: ignore[override]
        return self.schema_

    @classmethod
    def of(cls, value: "OutputSpec | dict | str | None") -> "OutputSpec":
        """An OutputSpec from a spec, its stored dict (`to_dict()`), a type name, or None (text)."""
        if isinstance(value, cls):
            return value
        return cls.model_validate(value if value is not None else {})

    def to_dict(self) -> dict[str, Any]:
        """Plain data: {type, labels, schema[, constrained]} (what runs store)."""
        data = {"type": self.type, "labels": self.labels, "schema": self.schema_}
        if self.constrained:
            data["constrained"] = True
        if self.judge is not None:
            data["judge"] = self.judge.model_dump(mode="json")
        if self.metric is not None:
            data["metric"] = self.metric
        return data

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
        if self.constrained and self.type != "json":
            why = ("label outputs are always constrained: each label is scored"
                   if self.type == "label" else "free text has no grammar to decode under")
            raise ValueError(f"'constrained: true' is only for type json ({why})")
        if self.metric is not None and self.metric not in JUDGED_BY[self.type]:
            raise ValueError(f"metric '{self.metric}' does not judge {self.type} answers "
                             f"(choose: {', '.join(JUDGED_BY[self.type])})")
        if self.schema_ is not None:
            import jsonschema

            try:
                jsonschema.validators.validator_for(self.schema_).check_schema(self.schema_)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"invalid JSON schema: {exc.message}") from None
        return self



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
        return self.strategy in PER_INPUT

    @field_validator("k")
    @classmethod
    def _k(cls, k: int, info: ValidationInfo) -> int:
        strategy = info.data.get("strategy")
        if strategy in PER_INPUT and k < 1:
            raise ValueError(f"strategy {strategy} needs k of at least 1 (got {k})")
        return k

    @field_validator("seed")
    @classmethod
    def _seed(cls, seed: int, info: ValidationInfo) -> int:
        strategy = info.data.get("strategy")
        if strategy in PER_INPUT and seed != 0:
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


def yaml_line(front_text: str, loc: tuple) -> int | None:
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
