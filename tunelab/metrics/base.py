"""What every metric shares: the answer it scores, the value it reports, and the `Metric` class.

Every metric reduces each example to a row of sufficient statistics (`Metric.stats`) and computes
its value from their column sums (`Metric.value`, vectorized over leading axes); the bootstrap in
`tunelab.stats` resamples those rows, so a corpus metric (macro-F1, field F1, corpus chrF and BLEU)
gets an interval over examples and a paired test exactly as a per-example one does.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass
class Answer:
    """One answer to score: what was expected, what came back, and what else the model said."""

    expected: str
    prediction: str
    example: Any = None  # the tunelab.datasets.Example, when scoring live
    extra: dict = field(default_factory=dict)  # free_text, label_logprobs, refs, ...
    scores: dict = field(default_factory=dict)  # per-example scores already computed (stored rows)

    @property
    def input(self) -> str:
        if self.example is not None:
            return self.example.input
        return str(self.extra.get("input", ""))

    @property
    def references(self) -> list[str]:
        """Every reference answer: the example's `meta.refs` (multi-reference data such as DART),
        as stored with a run's row (`extra["refs"]`), else the expected output alone."""
        meta = getattr(self.example, "meta", None) or {}
        refs = meta.get("refs") if isinstance(meta, dict) else None
        if refs is None:
            refs = self.extra.get("refs")
        if isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs):
            return refs
        return [self.expected]


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


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def f1(tp, fp, fn):
    return ratio(2 * np.asarray(tp, float), 2 * np.asarray(tp, float) + fp + fn)


def num(x, empty: float = float("nan")) -> float:
    v = float(np.asarray(x))
    return empty if math.isnan(v) else v


class quiet:
    """RuntimeWarnings (a mean of an all-nan resample) silenced."""

    def __enter__(self):
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


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
        return ratio(sums[..., 0], sums[..., 1])

    def details(self, answers: list[Answer]) -> dict | None:
        return None

    def paired_stats(self, answers_a: list[Answer], answers_b: list[Answer]) -> tuple[np.ndarray, np.ndarray]:
        """`stats` of two runs on the same examples, with the same columns (for paired tests)."""
        return self.stats(answers_a), self.stats(answers_b)

    def __repr__(self) -> str:
        return f"<metric {self.name}>"
