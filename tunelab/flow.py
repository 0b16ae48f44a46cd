# longer than 600 lines: the flow reads top to bottom, its steps and their names in one place
"""The whole flow, start to finish: data → prompt → optimize | fine-tune → hybrid → compare → advice.

    run_flow("my-workspace", flow_for("data/tickets/"))   # or: tunelab flow data/tickets/ [--quick]
    run_demo("demo-workspace")                            # the same flow on the bundled data: tunelab demo

The demo is a flow on the bundled support-ticket data (`demo_flow()`); `flow_for(path)` builds the
flow for a user's labelled data. The steps:

1. make (or enter) the demo workspace and import + check `examples/support`;
2. the baseline prompt `support-router` (a hand-written instruction listing the 8 teams), evaluated;
3. prompt optimization (instruction variants and few-shot demos, a small budget, on validation);
4. a LoRA fine-tune of SmolLM2-135M with a short prompt (`support-short`);
5. a hybrid: the fine-tuned model first, the optimized prompt where it is unsure;
6. the comparison of all of them on the test split, with the classical baselines (labels:
   `baseline:majority`, `baseline:tfidf`, `baseline:embed`; JSON: `baseline:majority`,
   `baseline:nearest`; free text: `baseline:nearest`) and, for labels, the learning curves of every
   trainable candidate within a time budget (`compare.curves`), its HTML report;
7. the advice.

Every step is idempotent: a finished run, optimization, fine-tune or hybrid is reused, an
unfinished fine-tune is resumed, so running the demo again is quick and an interrupted demo
continues where it stopped. `quick=True` is a tiny version (few examples, a few training steps)
for tests.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from tunelab import finetune as ft
from tunelab.compare import Advice, Comparison, Constraints, advise, compare, print_table
from tunelab.datasets import (check_path, get_dataset, import_dataset, read_source, save_dataset, split_examples,
                              subsample)
from tunelab.datasets.check import SKEWED_SHARE, infer_output, skewed_labels
from tunelab.errors import UserError
from tunelab.evaluate import RunResult, evaluate, hybrid_path, read_hybrid, resolve_candidate
from tunelab.finetune.search import SearchSpace
from tunelab.finetune.search import search as search_finetune
from tunelab.hybrid import create_hybrid
from tunelab.models import free_weights, release_memory
from tunelab.models.weights import BUNDLED, bundled
from tunelab.optimize import find_optimization, optimize
from tunelab.files import read_text
from tunelab.prompts import OutputSpec, commit_prompt, parse_prompt, prompt_path, prompt_versions
from tunelab.workspace import Workspace

DATASET = "support"
BASE_PROMPT = "support-router"
SHORT_PROMPT = "support-short"
FINETUNE = "support-ft"
HYBRID = "support-hybrid"
DEFAULT_BASE = "smollm2-135m"
# Skewed labels: the fine-tune trains until the rarer labels have each been seen about this many
# times (at most FLOW_MAX_EPOCHS epochs). On legal_unfair_tos (`Other` 91% of 2,000 sentences, the
# other 8 labels a median of 18.5 examples) one epoch answered `Other` (test macro-F1 0.124); three
# of the same recipe reached 0.700 (validation 0.196 / 0.389 / 0.622 by epoch; docs/results.md).
RARE_LABEL_EXPOSURES = 50
FLOW_MAX_EPOCHS = 3
MAX_PROMPT_TOKENS = 900  # few-shot candidates longer than this are not tried (they cost time on every request)

SHORT_PROMPT_TEXT = """---
model: smollm2-135m
temperature: 0
output:
  type: label
  labels: [billing, technical, account, shipping, returns, sales, security, feedback]
description: The short prompt the fine-tuned model is trained and run with (tunelab demo).
---
user:
Route this customer message to a team.

Message: {{ input }}
"""


@dataclass
class Flow:
    """What the whole flow runs on: a dataset folder (train/validation/test JSONL), the baseline
    prompt, the short prompt the fine-tuned model is trained and run with, and the names and
    settings of what it makes. `demo_flow()` is the bundled support-ticket flow; `flow_for(folder)`
    builds one for any labelled dataset folder (`tunelab flow`, `bench/full_flow.py`)."""

    data_dir: Path
    dataset: str = DATASET
    base_prompt: str = BASE_PROMPT
    base_prompt_text: str = ""
    short_prompt: str = SHORT_PROMPT
    short_prompt_text: str = SHORT_PROMPT_TEXT
    finetune: str = FINETUNE
    hybrid: str = HYBRID
    finetune_settings: dict[str, Any] = field(default_factory=lambda: {
        "method": "lora", "lora_r": 16, "lora_alpha": 32.0, "lr": 1e-3, "epochs": 2, "batch_size": 8})
    optimize_budget: int = 8
    limit_validation: int | None = None   # optimize on the first N validation examples only
    label_definitions: dict[str, str] | None = None
    extra_candidates: list[str] = field(default_factory=list)  # more candidates for the comparison
    output_type: str = "label"  # label | json | text, inferred from the train outputs
    constrained_prompt: str | None = None  # json: the baseline decoded under its schema's grammar
    constrained_prompt_text: str = ""
    bases: list[str] = field(default_factory=lambda: [DEFAULT_BASE])  # prompts and fine-tunes on each, side by side
    search: int | None = None  # fine-tune by a hyperparameter search of this many trials (`finetune.search`)
    head: str | None = None  # "classify": label tasks also fine-tune ft:NAME-head (LoRA + a classification head)
    metric: str | None = None  # what every step maximizes and the comparison ranks by (None: the type's default)
    metric_why: str = ""  # why, when the flow chose it (skewed labels) or was told (--metric)
    epochs_why: str = ""  # why the fine-tune trains more than one epoch, when the flow chose it (`flow_epochs`)


def demo_flow() -> Flow:
    """The bundled demo: `examples/support` with its `support-router` prompt."""
    src = examples_dir()
    return Flow(data_dir=src, base_prompt_text=(src / f"{BASE_PROMPT}.prompt").read_text(encoding="utf-8"))


# What `flow_for` checks before the flow starts: outputs must look like class labels.
PROMPT_LABELS = 40  # more labels than this are left out of the prompts' text (the label trie constrains the answer)
GENERATIVE_VALIDATION = 100  # JSON and text: fine-tuning validates on this many validation examples
MANY_LABELS_BUDGET = 4  # past PROMPT_LABELS labels: prompt optimization trials (each scores a large label trie)
MANY_LABELS_VALIDATION = 100  # ... and validation examples for optimizing and fine-tuning
FLOW_MINUTES = 10.0  # the flow's time budget: the learning curves measure the series that fit what is left of it
CURVE_SAMPLE = 300  # ... each point measured on this many test examples (the same rows for every point)
BASELINES = ("baseline:majority", "baseline:tfidf", "baseline:embed")  # label tasks: the classical reference rows


def _labels_yaml(labels: list[str]) -> str:
    """`labels` as a YAML flow sequence: plain words as they are, anything YAML would read as
    something else (yes, 1, null, a colon, a quote) JSON-quoted."""
    special = {"yes", "no", "true", "false", "on", "off", "null", "y", "n", "~"}
    plain = all(re.fullmatch(r"[A-Za-z][A-Za-z0-9 _\-]*", x) and x.lower() not in special and x == x.strip()
                for x in labels)
    return "[" + ", ".join(labels) + "]" if plain else json.dumps(list(labels), ensure_ascii=False)


def flow_prompts(name: str, labels: list[str], task: str | None = None, field: str | None = None,
                 origin: str = "tunelab flow", metric: str | None = None) -> tuple[str, str]:
    """(baseline prompt text, short prompt text) for dataset `name` with `labels`: the baseline asks
    `task` (default: which label fits) and lists the labels; the short prompt is what the fine-tuned
    model is trained and run with. `field` is what the prompts call the input (default Text);
    `origin` goes into the prompts' descriptions; `metric` what their answers are judged by
    (`output.metric`, default accuracy)."""
    task = (task or "Which label fits this text?").strip()
    field = (field or "Text").strip() or "Text"
    labels_yaml = _labels_yaml(labels)
    answer = "one word" if all(len(label.split()) == 1 for label in labels) else "one of these"
    listed = f"Answer with {answer}: {{{{ labels | join(\", \") }}}}."
    if len(labels) > PROMPT_LABELS:  # a list this long costs every request and helps a small model little
        listed = "Answer with the label only."
    judged = f"\n  metric: {metric}" if metric else ""
    base = f"""---
model: smollm2-135m
temperature: 0
output:
  type: label
  labels: {labels_yaml}{judged}
description: baseline zero-shot prompt for {name} ({origin})
---
user:
{task} {listed}

{field}: {{{{ input }}}}
"""
    short = f"""---
model: smollm2-135m
temperature: 0
output:
  type: label
  labels: {labels_yaml}{judged}
description: the short prompt the fine-tuned model is trained and run with ({origin})
---
user:
Label this {field.lower()}.

{field}: {{{{ input }}}}
"""
    return base, short


def infer_schema(outputs: list[str]) -> dict[str, Any]:
    """A JSON Schema every train output matches, inferred by genson: the keys seen (optional unless
    present in every output), their types, and no other keys (`additionalProperties: false`)."""
    from genson import SchemaBuilder

    builder = SchemaBuilder(schema_uri=None)
    for text in outputs:
        builder.add_object(json.loads(text))
    schema = builder.to_schema()

    def closed(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: closed(v) for k, v in node.items()}
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            return node
        if isinstance(node, list):
            return [closed(v) for v in node]
        return node

    return closed(schema)


def generative_prompts(name: str, output_type: str, outputs: list[str], schema: dict[str, Any] | None,
                       task: str | None, field: str, origin: str, metric: str | None = None) -> tuple[str, str, str]:
    """(baseline, short, constrained) prompt texts for a JSON or text task: the baseline states the
    task (and for JSON the schema); the short prompt is what the fine-tuned model is trained and
    run with; the constrained prompt (JSON only, else "") is the baseline decoded under its
    schema's grammar."""
    longest = max((len(o) for o in outputs), default=64)
    max_tokens = max(32, min(512, longest // 2 + 24))
    field = (field or ("Text" if output_type == "json" else "Input")).strip()
    if output_type == "json":
        task = (task or "Extract the fields of this text as a JSON object.").strip()
        spec = f"output:\n  type: json\n  schema: {json.dumps(schema, ensure_ascii=False)}\n"
        instruction = f"{task} Answer with the JSON only, matching this JSON schema:\n{{{{ schema }}}}"
        short_line = "Extract the fields as JSON."
    else:
        task = (task or "Write the answer for this input.").strip()
        spec = "output:\n  type: text\n" if metric else "output: text\n"
        instruction = task
        short_line = "Write the answer."
    if metric:
        spec += f"  metric: {metric}\n"

    def prompt(description: str, body: str, constrained: bool = False) -> str:
        out = spec + ("  constrained: true\n" if constrained else "")
        return (f"---\nmodel: smollm2-135m\ntemperature: 0\nmax_tokens: {max_tokens}\n{out}"
                f"description: {description} ({origin})\n---\nuser:\n{body}\n\n{field}: {{{{ input }}}}\n")

    base = prompt(f"baseline zero-shot prompt for {name}", instruction)
    short = prompt("the short prompt the fine-tuned model is trained and run with", short_line)
    constrained = prompt(f"the baseline for {name}, decoded under the schema's grammar", instruction, True) \
        if output_type == "json" else ""
    return base, short, constrained


def flow_name(text: str) -> str:
    """`text` as a name the workspace accepts for datasets and prompts (letters, digits, '-', '_',
    '.'; starting with a letter or digit), short enough for the suffixes the flow adds."""
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", text).strip("-_.")
    name = re.sub(r"^[^A-Za-z0-9]+", "", name)[:80].rstrip("-_.")
    return name or "data"


def flow_for(data_dir: str | Path, *, name: str | None = None, task: str | None = None, field: str | None = None,
             epochs: int | None = None, budget: int | None = None, limit_validation: int | None = None,
             extra_candidates: list[str] | None = None, labels: list[str] | None = None,
             schema: str | Path | dict | None = None, origin: str = "tunelab flow", bases: list[str] | None = None,
             search: int | None = None, head: str | None = None, metric: str | None = None) -> Flow:
    """The whole flow for a labelled dataset of the user's: `data_dir` is a data file or a folder of
    train, validation and test files (.jsonl with input/output, or .csv; val/dev also name
    validation). Missing validation and test splits are split off train when the data is imported
    (`split_examples`: seeded, stratified, 10% each).
    The output type is inferred from the train outputs (`infer_output`): JSON objects (their schema
    inferred by genson unless `schema`, a JSON Schema file, is given), labels (2 to 1000 distinct short
    outputs that repeat: the labels; past PROMPT_LABELS the prompts do not list them), else free text. The dataset, prompts (`NAME-zero-shot`, `NAME-short`, for
    JSON `NAME-constrained`), fine-tune (`NAME-ft`) and hybrid (`NAME-hybrid`) are named after `name`
    (default the folder's name, made a valid name). Raises UserError when the path is missing or has
    no train data. `labels` gives the label order for the prompts (default: the train outputs,
    sorted). `budget` (prompt optimization trials) and `limit_validation` default to 8 and 150, and to
    MANY_LABELS_BUDGET and MANY_LABELS_VALIDATION past PROMPT_LABELS labels, where every LLM
    evaluation scores a large label trie (the fine-tune then validates on that many examples too).
    `head="classify"`: label tasks also fine-tune `NAME-ft-head`, the same recipe with a classification
    head (`tunelab finetune --head classify`), compared beside the generative fine-tune. `metric`:
    what every step maximizes and the comparison ranks by (the prompts' `output.metric`; default the
    type's, and for labels where one label is SKEWED_SHARE of train or more, macro_f1: accuracy would
    rank "always answer the majority" near the top). `epochs`: the fine-tune's epochs (default
    `flow_epochs`: one, more for skewed labels whose rarer labels have few examples)."""
    src = Path(data_dir).expanduser()
    expected = ("a data file, or a folder with a train file and optionally validation and test files "
                "(train.jsonl, validation.jsonl, test.jsonl; .csv also works)")
    if not src.exists():
        raise UserError(f"{src} does not exist: tunelab flow takes {expected}")
    files, _ = read_source(src)
    if "train" not in files:
        raise UserError(f"{src} has no train file: tunelab flow takes {expected}")
    train = files["train"].examples
    if not train:
        raise UserError(f"{files['train'].path}: no readable examples (expected one JSON object a line with "
                        "'input' and 'output')")
    outputs = [ex.output for ex in train]
    distinct = sorted(set(outputs))
    if len(distinct) < 2:
        raise UserError(f"{files['train'].path}: every train output is {distinct[0]!r}: nothing to learn "
                        "(a task needs 2 or more different outputs)")
    kind = infer_output(outputs)
    if head not in (None, "none", "classify"):
        raise UserError(f"unknown head '{head}' (expected: classify)", field="head")
    if head == "classify" and kind != "label":
        raise UserError(f"--head classify fine-tunes label outputs; the train outputs of {files['train'].path} are "
                        f"{kind}", field="head")
    if schema is not None and kind != "json":
        raise UserError(f"--schema is for JSON outputs; the train outputs of {files['train'].path} are {kind}")
    metric, metric_why = judged_by(kind, outputs, metric)
    epochs_why = ""
    if epochs is None:
        epochs, epochs_why = flow_epochs(kind, outputs)
    stem = flow_name(name or (src.resolve().stem if src.is_file() else src.resolve().name))
    folder = src.resolve().name  # the descriptions name the folder as it is, where YAML reads it plainly
    about = folder if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", folder) else stem
    constrained = ""
    many = kind == "label" and len(distinct) > PROMPT_LABELS
    budget = budget or (MANY_LABELS_BUDGET if many else 8)
    limit_validation = limit_validation or (MANY_LABELS_VALIDATION if many else 150)
    if kind == "label":
        base, short = flow_prompts(about, list(labels) if labels else distinct, task, field, origin=origin,
                                   metric=metric)
    else:
        if kind == "json":
            schema = read_schema(schema) if schema is not None else infer_schema(outputs)
        base, short, constrained = generative_prompts(about, kind, outputs, schema, task,
                                                      field if field != "Text" or kind == "json" else "Input", origin,
                                                      metric)
    return Flow(data_dir=src, dataset=stem, base_prompt=f"{stem}-zero-shot", base_prompt_text=base,
                short_prompt=f"{stem}-short", short_prompt_text=short, finetune=f"{stem}-ft", hybrid=f"{stem}-hybrid",
                finetune_settings={"method": "lora", "lora_r": 16, "lora_alpha": 32.0, "lr": 1e-3,
                                   "epochs": epochs, "batch_size": 8,
                                   # generated answers cost a decoding per validation example: early
                                   # stopping watches a seeded sample of the validation split
                                   **({"max_val_examples": GENERATIVE_VALIDATION} if kind != "label" else {}),
                                   **({"max_val_examples": limit_validation} if many else {})},
                optimize_budget=budget, limit_validation=limit_validation,
                extra_candidates=list(extra_candidates or []), output_type=kind,
                constrained_prompt=f"{stem}-constrained" if constrained else None, constrained_prompt_text=constrained,
                bases=check_bases(bases), search=search, head=head if head == "classify" else None,
                metric=metric, metric_why=metric_why, epochs_why=epochs_why)


def flow_epochs(kind: str, outputs: list[str]) -> tuple[int, str]:
    """(the flow's fine-tuning epochs, why when more than one). One epoch, except for skewed labels
    (one label SKEWED_SHARE of train or more) whose other labels have few examples: one epoch of
    mostly-majority batches teaches the majority only, so the fine-tune trains until those labels
    (their median count) have been seen about RARE_LABEL_EXPOSURES times, at most FLOW_MAX_EPOCHS.
    Balanced labels with few examples each (clinc150) learn them all from the first epoch."""
    counts = skewed_labels(kind, outputs)
    rest = [n for _, n in counts[1:]] if counts else []
    if not rest:
        return 1, ""
    top = counts[0][0]
    rare = statistics.median(rest)
    epochs = min(FLOW_MAX_EPOCHS, max(1, math.ceil(RARE_LABEL_EXPOSURES / rare)))
    if epochs == 1:
        return 1, ""
    return epochs, (f"fine-tuning for {epochs} epochs: the {len(rest)} labels other than '{top}' have a median of "
                    f"{rare:g} train examples, which one epoch of mostly '{top}' does not teach (--epochs N to "
                    "choose)")


def judged_by(kind: str, outputs: list[str], metric: str | None) -> tuple[str | None, str]:
    """(the metric a flow's prompts name, why) for outputs of type `kind`: `metric` when given
    (checked against the type: a UserError naming the choices), else None (the type's default)
    — except labels where the most frequent train output is SKEWED_SHARE of train or more, which
    are judged by macro_f1 (every label counts the same)."""
    if metric is not None:
        try:
            OutputSpec(type=kind, labels=["a"] if kind == "label" else None, metric=metric.strip())
        except ValidationError as exc:
            raise UserError(exc.errors()[0]["msg"].removeprefix("Value error, "), field="metric") from None
        return metric.strip(), f"judged by {metric.strip()} (--metric)"
    counts = skewed_labels(kind, outputs)
    if counts is None:
        return None, ""
    top, share = counts[0][0], counts[0][1] / len(outputs)
    return "macro_f1", (f"judged by macro-F1: '{top}' is {share:.0%} of the train outputs, so always answering it "
                        f"would score {share:.2f} accuracy (--metric accuracy to judge by accuracy)")


def read_schema(path: str | Path | dict) -> dict[str, Any]:
    """A JSON Schema from a file (`--schema FILE`): a UserError naming the file when it is not JSON
    or not a valid JSON Schema."""
    if isinstance(path, dict):
        schema = path
        where: Any = "--schema"
    else:
        where = Path(path).expanduser()
        try:
            schema = json.loads(read_text(where, missing="schema file not found"))
        except ValueError as exc:
            raise UserError(f"not JSON: {exc}", path=where) from None
    if not isinstance(schema, dict):
        raise UserError("a JSON Schema is a JSON object", path=where)
    try:
        OutputSpec(type="json", schema=schema)
    except ValidationError as exc:
        raise UserError(exc.errors()[0]["msg"].removeprefix("Value error, "), path=where) from None
    return schema


def check_bases(bases: list[str] | None) -> list[str]:
    """The base models to compare (default: the bundled SmolLM2), each a bundled name or a model folder;
    an unknown one is a one-line error before anything runs."""
    bases = [b.strip() for b in (bases or [DEFAULT_BASE]) if b.strip()]
    if not bases:
        raise UserError("--bases needs at least one base model, e.g. smollm2-135m,gemma3-270m", field="bases")
    for base in bases:
        if bundled(base) is None and not Path(base).expanduser().is_dir():
            raise UserError(f"unknown base model '{base}' (bundled: {', '.join(BUNDLED)}; or a local Hugging Face "
                            "model folder)", field="bases")
    if len(set(bases)) < len(bases):
        raise UserError(f"--bases lists a base twice: {','.join(bases)}", field="bases")
    return bases


def base_suffix(flow: Flow, base: str) -> str:
    """What names the flow's prompts and fine-tune on `base`: nothing for the first base, else
    `-BASE` (the bundled name, or the model folder's)."""
    if base == flow.bases[0]:
        return ""
    return "-" + flow_name(bundled(base).name if bundled(base) else Path(base).name)


def on_base(flow: Flow, base: str) -> tuple[str, str, str, str]:
    """(baseline prompt name, its text, short prompt name, its text) on `base`."""
    suffix = base_suffix(flow, base)

    def pinned(text: str) -> str:
        return re.sub(r"(?m)^model: .*$", f"model: {base}", text, count=1)

    return (flow.base_prompt + suffix, pinned(flow.base_prompt_text), flow.short_prompt + suffix,
            pinned(flow.short_prompt_text))


def finetune_name(flow: Flow, base: str) -> str:
    return flow.finetune + base_suffix(flow, base)


def examples_dir() -> Path:
    """The bundled demo data: `tunelab/examples/support`, shipped in the package (the checkout's
    `examples/support` is a link to it)."""
    here = Path(__file__).resolve().parent / "examples" / "support"
    if not (here / "train.jsonl").is_file():
        raise UserError(f"the demo data is missing: {here} has no train.jsonl (reinstall tunelab)")
    return here


class Steps:
    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.n, self.log = total, 0, log
        self.started = time.perf_counter()
        self.times: dict[str, float] = {}
        self._t = self.started
        self._name = ""

    def __call__(self, key: str, title: str) -> None:
        self._close()
        self.n += 1
        self._name = key
        self._t = time.perf_counter()
        self.log(f"\n[{self.n}/{self.total}] {title}  (elapsed {self.elapsed():.0f} s)")

    def _close(self) -> None:
        if self._name:
            self.times[self._name] = time.perf_counter() - self._t

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def done(self) -> None:
        self._close()
        self._name = ""


@dataclass
class FlowResult:
    """What `run_flow` leaves: the workspace, the comparison (its advice inside), the report's path,
    and how long each step took."""

    workspace: str
    comparison: Comparison
    advice: Advice
    report: str
    times: dict[str, float]
    wall_s: float


def run_demo(directory: str | Path = "demo-workspace", **options: Any) -> FlowResult:
    """Run the demo: the flow on the bundled support-ticket data (see the module doc)."""
    return run_flow(directory, demo_flow(), **options)


def run_flow(directory: str | Path, flow: Flow, *, quick: bool = False, volume: float = 100_000,
             log: Callable[[str], None] = print, console: Any = None, learning_curve: bool | None = None,
             optimize_budget: int | None = None, workspace_name: str = "tunelab-demo",
             minutes: float | None = None) -> FlowResult:
    """Run the whole flow of `flow` in the workspace at `directory` (made if missing).
    `learning_curve`: None (default) measures the learning curves that fit what is
    left of the flow's time budget, `minutes` (default FLOW_MINUTES) from the start, after the
    comparison's own evaluations: the baselines always (seconds), the per-input-demo prompt and the
    fine-tune retrained on 10/25/50% when their estimated time fits (the report names what was
    left out); each point on CURVE_SAMPLE test examples. True: every curve; False: none."""
    label_task = flow.output_type == "label"
    minutes = FLOW_MINUTES if minutes is None else float(minutes)
    if not minutes > 0:
        raise UserError(f"--minutes must be a number of minutes above 0 (got {minutes:g})", field="minutes")
    deadline = time.monotonic() + 60 * minutes if learning_curve is None else None  # --learning-curve: all
    learning_curve = True if learning_curve is None else bool(learning_curve)
    steps = Steps(7, log)
    progress = console if console is not None else True

    steps("data", f"workspace and data: import and check {flow.data_dir}")
    ws = Workspace.init(directory, name=workspace_name)
    log(f"workspace: {ws.root}")
    data_ref = _import_data(ws, flow, quick, log)
    if flow.metric_why:
        log(flow.metric_why)
    if flow.epochs_why:
        log(flow.epochs_why)

    first = flow.bases[0]
    candidates: list[str] = []
    per_base: dict[str, tuple[str, str]] = {}  # base -> (optimized prompt, fine-tune)
    steps("baseline", f"baseline prompt '{flow.base_prompt}'" + (f" (and '{flow.constrained_prompt}', decoded under "
          "the schema's grammar)" if flow.constrained_prompt else "") + ": evaluate on the test split"
          + (f" (on {', '.join(flow.bases)})" if len(flow.bases) > 1 else ""))
    for base in flow.bases:
        base_name, base_text, short_name, short_text = on_base(flow, base)
        baseline = _ensure_prompt(ws, base_name, base_text)
        short = _ensure_prompt(ws, short_name, short_text)
        base_result = evaluate(ws, resolve_candidate(ws, baseline), f"{data_ref}:test", progress=progress)
        _report_run(log, base_result)
        candidates.append(baseline)
        per_base[base] = (baseline, short)
    constrained = None
    if flow.constrained_prompt:  # the baseline decoded under the grammar of its schema (first base)
        constrained = _ensure_prompt(ws, flow.constrained_prompt, flow.constrained_prompt_text)
        _report_run(log, evaluate(ws, resolve_candidate(ws, constrained), f"{data_ref}:test", progress=progress))
        candidates.append(constrained)

    steps("optimization", "prompt optimization on the validation split (instructions, few-shot demos)")
    for base in flow.bases:
        baseline = per_base[base][0]
        optimized = _optimize(ws, baseline, data_ref, flow,
                              budget=optimize_budget or (2 if quick else flow.optimize_budget), progress=progress,
                              log=log)
        if optimized != baseline:
            candidates.append(optimized)
        per_base[base] = (optimized, per_base[base][1])

    release_memory()  # the evaluator's models are not needed while training (they reload in a second)
    how = f"a search of {flow.search} trials" if flow.search else "LoRA"
    steps("fine-tuning", f"fine-tuning: {how} on {', '.join(flow.bases)} with the short prompt "
          f"'{flow.short_prompt}' -> " + ", ".join(f"ft:{finetune_name(flow, b)}" for b in flow.bases))
    for base in flow.bases:
        _finetune(ws, data_ref, flow, quick=quick, log=log, base=base, prompt=per_base[base][1].split("@")[0])
        candidates.append(f"ft:{finetune_name(flow, base)}")
    if flow.head and label_task:  # the same recipe with a classification head, beside the generative one
        _finetune(ws, data_ref, flow, quick=quick, log=log, base=first, prompt=per_base[first][1].split("@")[0],
                  head=flow.head)
        candidates.append(f"ft:{finetune_name(flow, first)}-head")
    optimized, short = per_base[first]

    release_memory()
    steps("hybrid", f"hybrid: ft:{flow.finetune} first, {optimized} where it is unsure or the input is unusual")
    _hybrid(ws, flow, optimized, log=log, progress=progress)
    free_weights()  # the hybrid's two models: the comparison loads one candidate's at a time

    candidates.append(f"hybrid:{flow.hybrid}")
    candidates += [c.replace("{short}", short) for c in flow.extra_candidates]
    if label_task:
        candidates += [b for b in BASELINES if b not in candidates]
    steps("comparison", "comparison on the test split with the classical baselines"
          + (" and the learning curves (10/25/50/100% of train)" if learning_curve else ""))
    comparison = compare(ws, f"{data_ref}:test", candidates, volume=volume, learning_curve=learning_curve,
                         curve_deadline=time.monotonic() + 5.0 if quick and deadline else deadline,
                         curve_sample=None if quick else CURVE_SAMPLE, progress=progress,
                         log=log)
    if console is not None:
        print_table(comparison, console, advice=False)

    steps("advice", "advice")
    advice = advise(comparison, Constraints(volume=volume))
    log(advice.headline)
    for reason in advice.reasons:
        log(f"  - {reason}")
    steps.done()
    log(f"\nreport: {comparison.report}")
    log(f"finished in {steps.elapsed():.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in steps.times.items()) + ")")
    return FlowResult(workspace=str(ws.root), comparison=comparison, advice=advice, report=comparison.report or "",
                      times=dict(steps.times), wall_s=steps.elapsed())


def _report_run(log, result: RunResult) -> None:
    m = result.metrics[result.primary_metric]
    log(f"{result.candidate}: {result.primary_metric} {m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}], "
        f"{result.tokens['total']:.0f} tokens/request" + (" (reused run)" if result.reused else ""))


def _import_data(ws, flow: Flow, quick: bool, log) -> str:
    src = flow.data_dir
    complete = {"train", "validation", "test"} <= set(read_source(src)[0])
    if complete and not quick:  # the import checks the data (and stops at errors) itself
        ds, report = import_dataset(ws, src, flow.dataset)
        splits: dict[str, list] = {}
    else:
        report, splits = check_path(src)
    if report.errors and (quick or not complete):
        raise UserError(f"{src} has errors: {report.summary()} (see 'tunelab data check {src}')")
    if not complete:
        missing = [s for s in ("validation", "test") if s not in splits]
        splits = _split_missing(splits)
        log(f"{src}: no {' or '.join(missing)} split; split off train (seed 0, stratified): "
            + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    if quick:
        small = {"train": subsample(splits["train"], 24), "validation": subsample(splits["validation"], 16),
                 "test": subsample(splits["test"], 16)}
        ds = save_dataset(ws, flow.dataset, small, source=f"{src} (quick subset)", check=report.to_dict())
        log(f"checked {report.summary()}; quick subset: " + ", ".join(f"{k} {len(v)}" for k, v in small.items()))
    elif not complete:
        ds = save_dataset(ws, flow.dataset, splits, source=f"{src} (validation/test split off train by tunelab flow)",
                          check=report.to_dict())
        log(f"checked {report.summary()}")
    else:
        log(f"checked {report.summary()}")
    for issue in report.warnings[:5]:
        log(f"  warning: {getattr(issue, 'message', issue)}")
    ds = get_dataset(ws, f"{flow.dataset}@{ds.version}")
    log(f"dataset {ds.ref}: " + ", ".join(f"{k} {len(v)}" for k, v in ds.splits.items())
        + (f"; {len(ds.labels)} labels: {', '.join(ds.labels[:12])}" + (", ..." if len(ds.labels) > 12 else "")
           if ds.labels else f"; output: {flow.output_type}"))
    return ds.ref


def _split_missing(splits: dict[str, list]) -> dict[str, list]:
    """train/validation/test, the missing validation and/or test split taken off train (10% each,
    seeded and stratified by `split_examples`)."""
    parts = split_examples(splits["train"], test=0.0 if "test" in splits else 0.1,
                           validation=0.0 if "validation" in splits else 0.1)
    return {"train": parts["train"], "validation": splits.get("validation") or parts["validation"],
            "test": splits.get("test") or parts["test"]}


def _ensure_prompt(ws, name: str, text: str) -> str:
    """The bundled prompt `text` as a committed version of `name` (the file written if missing);
    returns NAME@VERSION. Later versions (the optimizer's) are left as they are."""
    path = prompt_path(ws, name)
    prompt = parse_prompt(text, name, path=f"{name} (bundled)", workspace=ws)
    if prompt.version not in prompt_versions(ws, name):
        commit_prompt(ws, name, "tunelab demo: the bundled prompt", text=text, write_file=not path.exists())
    return f"{name}@{prompt.version}"


def _optimize(ws, baseline: str, data_ref: str, flow: Flow, *, budget: int, progress, log) -> str:
    """The optimized prompt version (a finished optimization of this seed on this data is reused)."""
    name, version = baseline.split("@", 1)
    found = find_optimization(ws, name, version, data_ref.split("@", 1)[1])
    if found is not None:
        log(f"reusing optimization {found.id}: {found.message}")
        return found.candidate
    result = optimize(ws, baseline, data_ref.split(":")[0], budget=budget, test=False, progress=progress,
                      max_prompt_tokens=MAX_PROMPT_TOKENS, limit_validation=flow.limit_validation,
                      label_definitions=flow.label_definitions)
    if not progress:  # the optimizer prints its outcome itself when it shows progress
        log(result.message)
    return result.candidate


def _finetune(ws, data_ref: str, flow: Flow, *, quick: bool, log, base: str | None = None,
              prompt: str | None = None, head: str | None = None) -> None:
    """ft:NAME on `base` (default the first base) with the short prompt: one LoRA, or with
    `flow.search` a hyperparameter search whose best trial becomes ft:NAME. Reused when done.
    `head="classify"`: ft:NAME-head, the same recipe with a classification head."""
    base = base or flow.bases[0]
    name = finetune_name(flow, base) + ("-head" if head else "")
    row = ft.get_row(ws, name)
    if row is not None and row.status == "done":
        log(f"reusing fine-tune ft:{name} ({row.wall_s:.0f} s, {row.tokens_trained:,} tokens trained)")
        return
    settings: dict[str, Any] = {"data": data_ref.split(":")[0], "prompt": prompt or flow.short_prompt, "name": name,
                                **flow.finetune_settings, **({"head": head} if head else {})}
    if base != DEFAULT_BASE or "base" in settings:
        settings["base"] = base
    if quick:
        settings.update(epochs=1, max_steps=3, batch_size=4, max_val_examples=8)
    config = ft.FineTuneConfig(**settings)  # an unknown setting is an error, never dropped
    if flow.search:
        # skewed labels judged by macro-F1: the class balance of the loss is searched too
        space = SearchSpace(balance=[0.0, 0.5, 1.0]) if flow.metric == "macro_f1" and flow.output_type == "label" \
            else None
        log(f"searching ft:{name}: {flow.search} trials on {base}" + (", class balance 0, 0.5 or 1" if space else ""))
        result = search_finetune(ws, config, trials=flow.search, space=space, progress=True, log=log).best
    else:
        resume = row is not None
        log(("resuming" if resume else "training") + f" ft:{name}: " +
            ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("data", "prompt", "name")))
        result = ft.finetune(ws, config, resume=resume, progress=True, log=log)
    log(f"{result.candidate}: {result.wall_s:.0f} s, {result.tokens_trained:,} tokens trained, cost ${result.cost:.4f}")


def _hybrid(ws, flow: Flow, fallback: str, *, log, progress) -> None:
    if hybrid_path(ws, flow.hybrid).is_file():
        spec = read_hybrid(ws, flow.hybrid)
        if spec.fallback == fallback and spec.primary == f"ft:{flow.finetune}":
            log(f"reusing hybrid:{flow.hybrid} ({_thresholds(spec)})")
            return
    spec = create_hybrid(ws, flow.hybrid, f"ft:{flow.finetune}", fallback, progress=progress).spec
    t = spec.tuning
    log(f"hybrid:{flow.hybrid}: {_thresholds(spec)}, similarity threshold "
        f"{spec.similarity_threshold:.3f}; on validation {t['metric']} {t['validation_score']:.3f} "
        f"(fine-tuned alone {t['primary_score']:.3f}, prompt alone {t['fallback_score']:.3f}), "
        f"fallback share {t['fallback_share']:.0%}")


def _thresholds(spec) -> str:
    if spec.confidence_threshold or spec.min_token_threshold or spec.invalid_to_fallback:
        return (f"token-probability threshold {spec.confidence_threshold:.3f} (least token "
                f"{spec.min_token_threshold:.3f})" + (", invalid answers to the fallback" if spec.invalid_to_fallback else ""))
    return f"margin threshold {spec.margin_threshold:.3f}"
