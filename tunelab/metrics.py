# longer than 600 lines: every built-in metric is a small class here, with the one aggregation they share.
"""Metrics: a per-example score plus an aggregate, each with a 95% interval.

    metrics = make_metrics(["accuracy", "macro_f1"], output)     # or default_metric_names(output)
    answers = [Answer(expected="spam", prediction="ham"), ...]
    values = aggregate(metrics, answers)                         # {name: MetricValue}
    values["accuracy"].value, values["accuracy"].lo, values["accuracy"].hi

Names (unknown -> NotFound):

| output | name | per example | aggregate |
|---|---|---|---|
| label | accuracy | prediction == expected | mean, Wilson interval |
| label | macro_f1 | - | mean of per-label F1 (labels seen in expected or predicted), bootstrap |
| label | format_valid | the free answer names a valid label (rows outside the free-answer sample: not counted; no free answer asked for: prediction is a label) | mean |
| label | free_accuracy | the label named by the free answer == expected | mean |
| json | json_valid | the prediction parses as JSON | mean |
| json | json_schema | it also validates against the output schema (jsonschema) | mean |
| json | field_f1 / field_precision / field_recall | per-field agreement of the JSON objects | micro over fields, bootstrap |
| json | json_match | the parsed objects are equal | mean |
| text | exact_match | equal after stripping whitespace | mean |
| text | normalized_match | equal after lower-casing and dropping punctuation | mean |
| text | contains | the expected text occurs in the prediction (normalized) | mean |
| text | regex:PATTERN | the prediction matches PATTERN (re.search) | mean |
| any | module:function | `function(example, prediction) -> float` | mean |

Every metric reduces each example to a row of sufficient statistics (`Metric.stats`) and computes
its value from their column sums (`Metric.value`); the bootstrap in `tunelab.stats` resamples those
rows. With `--repeat K` the rows of one example are averaged first, so intervals are over
examples, not over repeats. A metric whose per-example scores are all 0 or 1 (and one repeat)
gets a Wilson interval; every other metric a seeded bootstrap.

`output` is the prompt's `OutputSpec` (or its stored dict; None: text).

More metrics plug in through the `tunelab.metrics` entry point group, the way the LLM-as-judge
does (`judge`, `judge:MODEL`: `tunelab.judge`): an entry point NAME is called as
`factory(spec, output, workspace) -> Metric` for the metric `NAME` or `NAME:ARG`. A metric that
answers best in batches (a judge model) overrides `score_many`.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from tunelab import stats as st
from tunelab.errors import NotFound, UserError
from tunelab.models.base import match_label, normalize
from tunelab.prompts import OutputSpec

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

OUTPUT_TYPES = ("label", "json", "text")


@dataclass
class Answer:
    """One answer to score: what was expected, what came back, and what else the model said."""

    expected: str
    prediction: str
    example: Any = None  # the tunelab.datasets.Example, when scoring live
    extra: dict = field(default_factory=dict)  # free_text, label_logprobs, ...
    scores: dict = field(default_factory=dict)  # per-example scores already computed (stored rows)


@dataclass
class MetricValue:
    name: str
    value: float
    lo: float
    hi: float
    n: int  # examples counted
    method: str  # "wilson" | "bootstrap" | "none"
    details: dict | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        for k in ("value", "lo", "hi"):
            if isinstance(data[k], float) and math.isnan(data[k]):
                data[k] = None
        if data["details"] is None:
            data.pop("details")
        return data


# -- helpers ------------------------------------------------------------------------------------

def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def parse_json(text: str) -> tuple[bool, Any]:
    """(ok, value): the JSON in a prediction. Whitespace and a ``` code fence around it are
    ignored, and so is text after the first complete JSON value (small models run on)."""
    s = (text or "").strip()
    if s.startswith("```"):
        s = re.sub(r"^```[a-zA-Z]*\s*", "", s)
        s = re.sub(r"\s*```\s*$", "", s)
    try:
        return True, json.loads(s)
    except (json.JSONDecodeError, ValueError):
        pass
    start = min([i for i in (s.find("{"), s.find("[")) if i >= 0], default=-1)
    if start < 0:
        return False, None
    try:
        value, _ = json.JSONDecoder().raw_decode(s[start:])
        return True, value
    except (json.JSONDecodeError, ValueError):
        return False, None


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def field_counts(expected: Any, predicted: Any) -> tuple[int, int, int]:
    """(tp, fp, fn) over the fields of two JSON objects; a non-object prediction has no fields."""
    exp = expected if isinstance(expected, dict) else {}
    pred = predicted if isinstance(predicted, dict) else {}
    tp = sum(1 for k, v in pred.items() if k in exp and _same_value(v, exp[k]))
    return tp, len(pred) - tp, len(exp) - tp


def _f1(tp, fp, fn):
    return _ratio(2 * np.asarray(tp, float), 2 * np.asarray(tp, float) + fp + fn)


# -- the metric classes ---------------------------------------------------------------------------

class Metric:
    """A per-example score plus an aggregate. Subclasses override `score` (per-example metrics)
    or `stats` + `value` (corpus metrics such as F1)."""

    name: str = "metric"
    binary: ClassVar[bool] = True  # per-example scores are 0/1: Wilson interval
    per_example: ClassVar[bool] = True  # `score` gives a stored per-example value
    higher_is_better: ClassVar[bool] = True
    percent: ClassVar[bool] = True  # a share in [0, 1]: differences are shown in points

    def score(self, answer: Answer) -> float | None:
        """The score of one answer (None: not applicable to this answer)."""
        raise NotImplementedError

    def score_many(self, answers: list[Answer]) -> list[float | None]:
        """The scores of several answers; a metric that calls a model overrides this to batch."""
        return [self.score(a) for a in answers]

    def stats(self, answers: list[Answer]) -> np.ndarray:
        """Per-answer sufficient statistics (n x k). Default: [score, counted]."""
        out = np.zeros((len(answers), 2))
        todo = [i for i, a in enumerate(answers) if self.name not in a.scores]
        fresh = dict(zip(todo, self.score_many([answers[i] for i in todo])))
        for i, a in enumerate(answers):
            s = fresh[i] if i in fresh else a.scores[self.name]
            if s is not None and not (isinstance(s, float) and math.isnan(s)):
                out[i] = (float(s), 1.0)
        return out

    def value(self, sums: np.ndarray, n: int) -> np.ndarray:
        """The metric from column sums of `stats` (vectorized over leading axes)."""
        return _ratio(sums[..., 0], sums[..., 1])

    def details(self, answers: list[Answer]) -> dict | None:
        return None

    def paired_stats(self, answers_a: list[Answer], answers_b: list[Answer]) -> tuple[np.ndarray, np.ndarray]:
        """`stats` of two runs on the same examples, with the same columns (for paired tests)."""
        return self.stats(answers_a), self.stats(answers_b)

    def __repr__(self) -> str:
        return f"<metric {self.name}>"


class Accuracy(Metric):
    name = "accuracy"

    def score(self, a: Answer) -> float:
        return float(a.prediction.strip() == a.expected.strip()
                     or normalize(a.prediction) == normalize(a.expected))


class ExactMatch(Metric):
    name = "exact_match"

    def score(self, a: Answer) -> float:
        return float(a.prediction.strip() == a.expected.strip())


class NormalizedMatch(Metric):
    name = "normalized_match"

    def score(self, a: Answer) -> float:
        return float(normalize(a.prediction) == normalize(a.expected))


class Contains(Metric):
    name = "contains"

    def score(self, a: Answer) -> float:
        exp = normalize(a.expected)
        return float(f" {exp} " in f" {normalize(a.prediction)} ") if exp else 1.0


class Regex(Metric):
    def __init__(self, pattern: str):
        self.name = f"regex:{pattern}"
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise UserError(f"metric '{self.name}': invalid regular expression ({exc})") from None

    def score(self, a: Answer) -> float:
        return float(self.pattern.search(a.prediction) is not None)


class FormatValid(Metric):
    """Would the answer be usable as is? label: the free answer names exactly one valid label
    (None, not counted, for a row outside the free-answer sample (`extra["free_text_skipped"]`);
    without a free answer asked for: the prediction is a label); json: it parses; text: it is not
    empty."""

    name = "format_valid"

    def __init__(self, output: OutputSpec):
        self.output = output

    def score(self, a: Answer) -> float | None:
        if self.output.type == "label":
            labels = self.output.labels or []
            free = a.extra.get("free_text")
            if free is not None:
                return float(match_label(free, labels) is not None)
            if a.extra.get("free_text_skipped"):
                return None
            return float(a.prediction in labels) if labels else float(bool(a.prediction.strip()))
        if self.output.type == "json":
            return float(parse_json(a.prediction)[0])
        return float(bool(a.prediction.strip()))


class FreeAccuracy(Metric):
    """Accuracy of the free (unconstrained) answer, matched to a label; None without one."""

    name = "free_accuracy"

    def __init__(self, output: OutputSpec):
        self.output = output

    def score(self, a: Answer) -> float | None:
        free = a.extra.get("free_text")
        if free is None:
            return None
        return float(match_label(free, self.output.labels or []) == a.expected.strip())


class MacroF1(Metric):
    """Macro-averaged F1 over the labels seen in expected or predicted answers."""

    name = "macro_f1"
    binary = False
    per_example = False

    def __init__(self, output: OutputSpec):
        self.output = output

    def label_set(self, answers: list[Answer], only_seen: bool = False) -> list[str]:
        """The output's labels, then any other answer seen (a label absent everywhere gets an
        undefined F1 and is left out of the mean)."""
        seen = {a.expected.strip() for a in answers} | {a.prediction.strip() for a in answers}
        ordered = [label for label in (self.output.labels or []) if label in seen or not only_seen]
        return ordered + sorted(seen - set(ordered))

    def paired_stats(self, answers_a, answers_b):
        labels = self.label_set(list(answers_a) + list(answers_b))
        return self.stats(answers_a, labels), self.stats(answers_b, labels)

    def stats(self, answers: list[Answer], labels: list[str] | None = None) -> np.ndarray:
        labels = labels or self.label_set(answers)
        index = {label: i for i, label in enumerate(labels)}
        L = len(labels)
        out = np.zeros((len(answers), 3 * L))
        for r, a in enumerate(answers):
            e, p = index[a.expected.strip()], index[a.prediction.strip()]
            if e == p:
                out[r, 3 * e] = 1  # tp
            else:
                out[r, 3 * p + 1] = 1  # fp of the predicted label
                out[r, 3 * e + 2] = 1  # fn of the expected label
        return out

    def value(self, sums: np.ndarray, n: int) -> np.ndarray:
        L = sums.shape[-1] // 3
        if L == 0:
            return np.full(sums.shape[:-1], np.nan)
        s = sums.reshape(*sums.shape[:-1], L, 3)
        f1 = _f1(s[..., 0], s[..., 1], s[..., 2])  # nan where a label is absent from a resample
        with np.errstate(invalid="ignore"), _quiet():
            return np.nanmean(f1, axis=-1)

    def details(self, answers: list[Answer]) -> dict:
        """Per-label precision/recall/F1/support and the confusion matrix {expected: {predicted: n}}."""
        labels = self.label_set(answers, only_seen=True)
        confusion = {e: {p: 0 for p in labels} for e in labels}
        for a in answers:
            confusion[a.expected.strip()][a.prediction.strip()] += 1
        per_label = {}
        for label in labels:
            tp = confusion[label][label]
            fp = sum(confusion[e][label] for e in labels) - tp
            fn = sum(confusion[label].values()) - tp
            per_label[label] = {
                "precision": _num(_ratio(tp, tp + fp)), "recall": _num(_ratio(tp, tp + fn)),
                "f1": _num(_f1(tp, fp, fn)), "support": tp + fn,
            }
        return {"labels": labels, "per_label": per_label, "confusion": confusion}


class JsonValid(Metric):
    name = "json_valid"

    def score(self, a: Answer) -> float:
        return float(parse_json(a.prediction)[0])


class JsonSchemaValid(Metric):
    name = "json_schema"

    def __init__(self, output: OutputSpec):
        if not output.schema:
            raise UserError("metric 'json_schema' needs a JSON schema in the prompt's output spec")
        import jsonschema

        try:
            cls = jsonschema.validators.validator_for(output.schema)
            cls.check_schema(output.schema)
        except jsonschema.SchemaError as exc:
            raise UserError(f"the output schema is not a valid JSON schema: {exc.message}") from None
        self.validator = cls(output.schema)

    def score(self, a: Answer) -> float:
        ok, value = parse_json(a.prediction)
        return float(ok and self.validator.is_valid(value))


class JsonMatch(Metric):
    """The parsed prediction equals the parsed expected output (exact object match)."""

    name = "json_match"

    def score(self, a: Answer) -> float:
        ok_e, exp = parse_json(a.expected)
        ok_p, pred = parse_json(a.prediction)
        if not ok_p:
            return 0.0
        if not ok_e:
            return float(a.prediction.strip() == a.expected.strip())
        if isinstance(exp, dict) and isinstance(pred, dict):
            return float(exp.keys() == pred.keys() and all(_same_value(pred[k], exp[k]) for k in exp))
        return float(_same_value(exp, pred))


class FieldF1(Metric):
    """Per-field agreement of JSON objects, micro-averaged over fields: a predicted field is a
    true positive when the expected object has the same key with the same value."""

    binary = False

    def __init__(self, which: str = "f1"):
        self.which = which
        self.name = f"field_{which}"

    def counts(self, a: Answer) -> tuple[int, int, int]:
        ok_e, exp = parse_json(a.expected)
        ok_p, pred = parse_json(a.prediction)
        return field_counts(exp if ok_e else {}, pred if ok_p else {})

    def score(self, a: Answer) -> float:
        tp, fp, fn = self.counts(a)
        v = _num(self.value(np.array([tp, fp, fn], float), 1))
        return None if math.isnan(v) else v

    def stats(self, answers: list[Answer]) -> np.ndarray:
        return np.array([self.counts(a) for a in answers], dtype=float).reshape(len(answers), 3)

    def value(self, sums: np.ndarray, n: int) -> np.ndarray:
        tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
        if self.which == "precision":
            v = _ratio(tp, tp + fp)
        elif self.which == "recall":
            v = _ratio(tp, tp + fn)
        else:
            v = _f1(tp, fp, fn)
        # No fields expected or predicted anywhere: every answer agreed that there is nothing.
        return np.where((tp + fp + fn) == 0, 1.0, v)

    def details(self, answers: list[Answer]) -> dict:
        per_field: dict[str, list[int]] = {}
        for a in answers:
            ok_e, exp = parse_json(a.expected)
            ok_p, pred = parse_json(a.prediction)
            exp = exp if ok_e and isinstance(exp, dict) else {}
            pred = pred if ok_p and isinstance(pred, dict) else {}
            for k in set(exp) | set(pred):
                c = per_field.setdefault(k, [0, 0, 0])
                if k in exp and k in pred and _same_value(pred[k], exp[k]):
                    c[0] += 1
                else:
                    c[1] += k in pred
                    c[2] += k in exp
        tot = np.array(list(per_field.values()) or [[0, 0, 0]], float).sum(0)
        return {
            "precision": _num(_ratio(tot[0], tot[0] + tot[1])),
            "recall": _num(_ratio(tot[0], tot[0] + tot[2])),
            "f1": _num(_f1(tot[0], tot[1], tot[2])),
            "per_field": {k: {"precision": _num(_ratio(tp, tp + fp)), "recall": _num(_ratio(tp, tp + fn)),
                              "f1": _num(_f1(tp, fp, fn)), "support": tp + fn}
                          for k, (tp, fp, fn) in sorted(per_field.items())},
        }


class Custom(Metric):
    """`module:function`: `function(example, prediction) -> float`, averaged over examples."""

    percent = False

    def __init__(self, spec: str, fn: Callable[[Any, str], float]):
        self.name = spec
        self.fn = fn

    def score(self, a: Answer) -> float | None:
        try:
            value = self.fn(a.example, a.prediction)
        except Exception as exc:  # a user's function: name it
            raise UserError(f"custom metric '{self.name}' failed: {type(exc).__name__}: {exc}") from exc
        if value is None:
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"custom metric '{self.name}' returned {value!r}; expected a number") from None


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def _num(x, empty: float = float("nan")) -> float:
    v = float(np.asarray(x))
    return empty if math.isnan(v) else v


# -- names -> metrics -----------------------------------------------------------------------------

SIMPLE: dict[str, Callable[[OutputSpec], Metric]] = {
    "accuracy": lambda o: Accuracy(),
    "macro_f1": MacroF1,
    "format_valid": FormatValid,
    "free_accuracy": FreeAccuracy,
    "exact_match": lambda o: ExactMatch(),
    "normalized_match": lambda o: NormalizedMatch(),
    "contains": lambda o: Contains(),
    "json_valid": lambda o: JsonValid(),
    "json_schema": JsonSchemaValid,
    "json_match": lambda o: JsonMatch(),
    "field_f1": lambda o: FieldF1("f1"),
    "field_precision": lambda o: FieldF1("precision"),
    "field_recall": lambda o: FieldF1("recall"),
}

PRIMARY = {"label": "accuracy", "json": "json_match", "text": "exact_match"}


ENTRY_POINTS = "tunelab.metrics"  # plug-in metrics: NAME -> factory(spec, output, workspace) -> Metric


def plugin_metrics() -> dict[str, Any]:
    """The metric factories registered under the `tunelab.metrics` entry point group, by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINTS)}


def metric_names() -> list[str]:
    plugins = [f"{name}[:ARG]" for name in sorted(plugin_metrics())]
    return sorted(SIMPLE) + ["regex:PATTERN", *plugins, "module:function"]


def default_metric_names(output: Any) -> list[str]:
    """The metrics a run computes when none are named, by output type."""
    out = OutputSpec.of(output)
    if out.type == "label":
        return ["accuracy", "macro_f1", "format_valid", "free_accuracy"]
    if out.type == "json":
        names = ["json_valid"] + (["json_schema"] if out.schema else []) + ["field_f1", "field_precision",
                                                                           "field_recall", "json_match"]
        return names
    return ["exact_match", "normalized_match", "contains", "format_valid"]


def primary_metric(output: Any) -> str:
    """The per-example correctness metric of an output type (failures, pass^k, McNemar)."""
    return PRIMARY[OutputSpec.of(output).type]


def make_metric(name: str, output: Any = None, workspace: "Workspace | None" = None) -> Metric:
    """The metric `name` for answers of `output`; `workspace` is handed to plug-in metrics (a
    judge reads its model and rubric from the workspace's tunelab.yaml)."""
    out = OutputSpec.of(output)
    name = name.strip()
    if name in SIMPLE:
        return SIMPLE[name](out)
    if name.startswith("regex:"):
        return Regex(name[len("regex:"):])
    plugin = plugin_metrics().get(name.partition(":")[0])
    if plugin is not None:
        return plugin.load()(name, out, workspace)
    if ":" in name:
        return Custom(name, load_custom(name))
    raise NotFound(f"unknown metric '{name}' (known: {', '.join(metric_names())})")


def make_metrics(names: list[str] | None, output: Any = None, workspace: "Workspace | None" = None) -> list[Metric]:
    """Metric objects for `names` (default: by output type), the primary one always included."""
    out = OutputSpec.of(output)
    names = list(names) if names else default_metric_names(out)
    primary = PRIMARY.get(out.type)
    if primary and primary not in names:
        names = [primary] + names
    seen: set[str] = set()
    metrics = []
    for n in names:
        if n not in seen:
            seen.add(n)
            metrics.append(make_metric(n, out, workspace))
    return metrics


def load_custom(spec: str) -> Callable[[Any, str], float]:
    """Import `module:function`; the current folder is searched too (a workspace's metrics.py)."""
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise NotFound(f"unknown metric '{spec}' (a custom metric is module:function)")
    added = False
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
        added = True
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise NotFound(f"unknown metric '{spec}': cannot import module '{module_name}' ({exc})") from None
    finally:
        if added:
            sys.path.remove("")
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise NotFound(f"unknown metric '{spec}': module '{module_name}' has no function '{func_name}'")
    return fn


# -- scoring and aggregating -----------------------------------------------------------------------

def score_answers(metrics: list[Metric], answers: list[Answer]) -> list[dict[str, float]]:
    """The per-example scores of each answer (corpus-only metrics are left out); each metric
    scores the whole batch at once (`score_many`)."""
    out: list[dict[str, float]] = [{} for _ in answers]
    for m in metrics:
        if m.per_example:
            for scores, s in zip(out, m.score_many(answers)):
                if s is not None:
                    scores[m.name] = s
    return out


def example_stats(metric: Metric, answers: list[Answer], groups: list[int] | None = None) -> np.ndarray:
    """`metric.stats(answers)`, with the rows of one example (its repeats) averaged together.
    `groups[i]` is the example index of answers[i]; the result has one row per example, in
    sorted example order."""
    return group_rows(metric.stats(answers), groups)


def group_rows(s: np.ndarray, groups: list[int] | None) -> np.ndarray:
    """Rows of `s` averaged per group (example index), in sorted group order."""
    if groups is None:
        return s
    g = np.asarray(groups)
    keys, inverse = np.unique(g, return_inverse=True)
    if len(keys) == len(g):
        return s[np.argsort(g, kind="stable")]
    sums = np.zeros((len(keys), s.shape[1]))
    np.add.at(sums, inverse, s)
    counts = np.bincount(inverse, minlength=len(keys)).astype(float)
    return sums / counts[:, None]


def aggregate(metrics: list[Metric], answers: list[Answer], groups: list[int] | None = None, *,
              resamples: int = st.RESAMPLES, seed: int = st.SEED) -> dict[str, MetricValue]:
    """Each metric's value over `answers`, with a 95% interval over examples."""
    repeated = groups is not None and len(set(groups)) != len(groups)
    out = {}
    for m in metrics:
        s = example_stats(m, answers, groups)
        n = s.shape[0]
        value = _num(m.value(s.sum(0), n)) if n else float("nan")
        counted = n
        if n == 0 or math.isnan(value):
            lo = hi = float("nan")
            method = "none"
        elif m.binary and not repeated and s.shape[1] == 2 and np.all(np.isin(s[:, 0], (0.0, 1.0))):
            counted = int(s[:, 1].sum())
            lo, hi = st.wilson(float(s[:, 0].sum()), counted)
            method = "wilson"
        else:
            lo, hi = st.bootstrap(s, m.value, resamples=resamples, seed=seed)
            method = "bootstrap"
            if s.shape[1] == 2 and type(m).stats is Metric.stats:
                counted = int(np.count_nonzero(s[:, 1]))
        out[m.name] = MetricValue(m.name, value, lo, hi, counted, method, m.details(answers))
    return out
