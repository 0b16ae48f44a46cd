"""Metric names to metric objects, per-example scores, and aggregates with 95% intervals."""

from __future__ import annotations

import importlib
import math
import sys
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from tunelab import stats as st
from tunelab.errors import NotFound, UserError
from tunelab.metrics.base import Answer, Metric, MetricValue, num
from tunelab.metrics.json import FieldF1, JsonMatch, JsonSchemaValid, JsonValid
from tunelab.metrics.labels import Accuracy, FormatValid, FreeAccuracy, MacroF1
from tunelab.metrics.text import (Contains, CopyRate, ExactMatch, LengthRatio, NormalizedMatch, Regex, RougeL,
                                  Semantic, bleu, chrf)
from tunelab.prompts import OutputSpec

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

OUTPUT_TYPES = ("label", "json", "text")


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


SIMPLE: dict[str, Callable[[OutputSpec], Metric]] = {
    "accuracy": lambda o: Accuracy(),
    "macro_f1": MacroF1,
    "format_valid": FormatValid,
    "free_accuracy": FreeAccuracy,
    "exact_match": lambda o: ExactMatch(),
    "normalized_match": lambda o: NormalizedMatch(),
    "contains": lambda o: Contains(),
    "chrf": lambda o: chrf(),
    "bleu": lambda o: bleu(),
    "rouge_l": lambda o: RougeL(),
    "semantic": lambda o: Semantic(),
    "length_ratio": lambda o: LengthRatio(),
    "copy_rate": lambda o: CopyRate(),
    "json_valid": lambda o: JsonValid(),
    "json_schema": JsonSchemaValid,
    "json_match": lambda o: JsonMatch(),
    "field_f1": lambda o: FieldF1("f1"),
    "field_precision": lambda o: FieldF1("precision"),
    "field_recall": lambda o: FieldF1("recall"),
}

# The one number a comparison, the optimizer, fine-tuning's early stopping and the hybrid's tuning
# maximize, per output type: label accuracy; JSON field F1 (credits every right field); text chrF
# (against every reference).
PRIMARY = {"label": "accuracy", "json": "field_f1", "text": "chrf"}


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
        return ["field_f1", "field_precision", "field_recall", "json_match", "json_valid"] + \
            (["json_schema"] if out.schema else []) + ["format_valid"]
    return ["chrf", "bleu", "rouge_l", "semantic", "exact_match", "length_ratio", "copy_rate", "format_valid"]


def primary_metric(output: Any) -> str:
    """The metric an output is judged by (comparisons, optimization, early stopping, a fine-tune
    search, failures, pass^k, the hybrid's tuning): its `metric` when it names one, else its type's."""
    out = OutputSpec.of(output)
    return out.metric or PRIMARY[out.type]


def example_metric(output: Any) -> str:
    """The per-example score that stands for an output's primary metric where one example is
    judged (failures, pass^k, a report's per-example scores): the primary itself when it scores
    examples, else its type's default (macro-F1, a corpus metric -> accuracy)."""
    out = OutputSpec.of(output)
    primary = primary_metric(out)
    return primary if make_metric(primary, out).per_example else PRIMARY[out.type]


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
    primary = primary_metric(out)
    if primary not in names:
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
        value = num(m.value(s.sum(0), n)) if n else float("nan")
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
