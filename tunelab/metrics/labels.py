"""Metrics of label outputs (and the format validity every output type has)."""

from __future__ import annotations

import numpy as np

from tunelab.metrics.base import Answer, Metric, f1, num, quiet, ratio
from tunelab.metrics.json import parse_json, schema_validator
from tunelab.models.base import match_label, normalize
from tunelab.prompts import OutputSpec


class Accuracy(Metric):
    name = "accuracy"

    def score(self, a: Answer) -> float:
        return float(a.prediction.strip() == a.expected.strip()
                     or normalize(a.prediction) == normalize(a.expected))


class FormatValid(Metric):
    """Would the answer be usable as is? label: the free answer names exactly one valid label
    (None, not counted, for a row outside the free-answer sample (`extra["free_text_skipped"]`);
    without a free answer asked for: the prediction is a label); json: it parses, and matches the
    output's schema when it has one; text: it is not empty."""

    name = "format_valid"

    def __init__(self, output: OutputSpec):
        self.output = output
        self.validator = schema_validator(output.schema) if output.type == "json" and output.schema else None

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
            ok, value = parse_json(a.prediction)
            return float(ok and (self.validator is None or self.validator.is_valid(value)))
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
        scores = f1(s[..., 0], s[..., 1], s[..., 2])  # nan where a label is absent from a resample
        with np.errstate(invalid="ignore"), quiet():
            return np.nanmean(scores, axis=-1)

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
                "precision": num(ratio(tp, tp + fp)), "recall": num(ratio(tp, tp + fn)),
                "f1": num(f1(tp, fp, fn)), "support": tp + fn,
            }
        return {"labels": labels, "per_label": per_label, "confusion": confusion}
