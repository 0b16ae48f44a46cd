"""Metrics of free-text outputs.

Matches (`exact_match`, `normalized_match`, `contains`, `regex:PATTERN`) and reference-based
scores from well-kept libraries, each against **every** reference of an example (`meta.refs` when
the data has several, else the expected output):

- `chrf` — chrF (character n-gram F-score, sacrebleu's `CHRF`, β=2) — the primary metric of text
  outputs: it credits near misses (inflections, word order) that word-level BLEU scores as 0 on
  one sentence, and it is stable on short outputs;
- `bleu` — BLEU (sacrebleu's `BLEU`: 4-grams, brevity penalty, exp smoothing);
- `rouge_l` — ROUGE-L F-measure (Google's `rouge-score`, stemmed), the best over the references;
- `semantic` — cosine similarity of sentence embeddings (the bundled all-MiniLM-L6-v2), the best
  over the references;
- `length_ratio` — words of the answer / words of the closest-length reference;
- `copy_rate` — share of the answer's words that occur in the input.

chrF and BLEU are corpus metrics, as sacrebleu computes them: each example contributes sacrebleu's
own sufficient statistics (n-gram matches and totals), the value is sacrebleu's score of their
sums, so the figure equals `sacrebleu.corpus_chrf` / `corpus_bleu` on the same data and the
bootstrap resamples examples. The per-example score stored with each row is the sentence-level
score (for the side-by-side outputs, failures and the hybrid's tuning). Scores are 0-1
(sacrebleu's 0-100 divided by 100).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from tunelab.demos import embed
from tunelab.errors import UserError
from tunelab.metrics.base import Answer, Metric
from tunelab.models.base import normalize

_WORDS = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORDS.findall((text or "").lower())


class ExactMatch(Metric):
    name = "exact_match"

    def score(self, a: Answer) -> float:
        return float(any(a.prediction.strip() == r.strip() for r in a.references))


class NormalizedMatch(Metric):
    name = "normalized_match"

    def score(self, a: Answer) -> float:
        return float(any(normalize(a.prediction) == normalize(r) for r in a.references))


class Contains(Metric):
    name = "contains"

    def score(self, a: Answer) -> float:
        pred = f" {normalize(a.prediction)} "
        refs = [normalize(r) for r in a.references]
        return float(any(f" {r} " in pred for r in refs if r)) if any(refs) else 1.0


class Regex(Metric):
    def __init__(self, pattern: str):
        self.name = f"regex:{pattern}"
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise UserError(f"metric '{self.name}': invalid regular expression ({exc})") from None

    def score(self, a: Answer) -> float:
        return float(self.pattern.search(a.prediction) is not None)


class SacreMetric(Metric):
    """A sacrebleu corpus metric: per-example sufficient statistics, the score of their sums."""

    binary = False

    def __init__(self, name: str, metric: Any, sentence: Any):
        self.name = name
        self.metric = metric  # the corpus scorer
        self.sentence = sentence  # the sentence-level scorer (BLEU: effective order)

    def stats(self, answers: list[Answer]) -> np.ndarray:
        if not answers:
            return np.zeros((0, 1))
        refs = [a.references for a in answers]
        width = max(len(r) for r in refs)
        streams = [[r[j] if j < len(r) else None for r in refs] for j in range(width)]
        # sacrebleu's own statistics of each sentence (its corpus score sums them)
        rows = self.metric._extract_corpus_statistics([a.prediction.strip() for a in answers], streams)
        return np.asarray(rows, dtype=float).reshape(len(answers), -1)

    def _score(self, scorer: Any, row: np.ndarray) -> float:
        return float(scorer._compute_score_from_stats(list(row)).score) / 100.0

    def value(self, sums: np.ndarray, n: int) -> np.ndarray:
        flat = sums.reshape(-1, sums.shape[-1])
        out = np.array([self._score(self.metric, row) for row in flat])
        return out.reshape(sums.shape[:-1])

    def score_many(self, answers: list[Answer]) -> list[float | None]:
        return [self._score(self.sentence, row) for row in self.stats(answers)]

    def score(self, a: Answer) -> float | None:
        return self.score_many([a])[0]


def chrf() -> SacreMetric:
    from sacrebleu.metrics import CHRF

    return SacreMetric("chrf", CHRF(), CHRF())


def bleu() -> SacreMetric:
    from sacrebleu.metrics import BLEU

    return SacreMetric("bleu", BLEU(), BLEU(effective_order=True))


class RougeL(Metric):
    name = "rouge_l"
    binary = False

    def __init__(self):
        from rouge_score import rouge_scorer

        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def score(self, a: Answer) -> float:
        return float(self.scorer.score_multi(a.references, a.prediction)["rougeL"].fmeasure)


class Semantic(Metric):
    """Cosine similarity of the answer's and each reference's sentence embedding, the best one."""

    name = "semantic"
    binary = False

    def score(self, a: Answer) -> float | None:
        return self.score_many([a])[0]

    def score_many(self, answers: list[Answer]) -> list[float | None]:
        if not answers:
            return []
        refs = [a.references for a in answers]
        flat = [r for rs in refs for r in rs]
        vectors = embed([a.prediction for a in answers] + flat)
        preds, ref_vecs = vectors[:len(answers)], vectors[len(answers):]
        out, k = [], 0
        for i, rs in enumerate(refs):
            sims = ref_vecs[k:k + len(rs)] @ preds[i]
            k += len(rs)
            out.append(float(max(0.0, sims.max())) if answers[i].prediction.strip() else 0.0)
        return out


class LengthRatio(Metric):
    """Words of the answer / words of the reference closest in length (1.0: as long)."""

    name = "length_ratio"
    binary = False
    percent = False

    def score(self, a: Answer) -> float | None:
        n = len(words(a.prediction))
        lengths = [len(words(r)) for r in a.references if words(r)]
        if not lengths:
            return None
        closest = min(lengths, key=lambda m: (abs(m - n), m))
        return n / closest


class CopyRate(Metric):
    """Share of the answer's words that occur in the input (data-to-text copies its entities)."""

    name = "copy_rate"
    binary = False

    def score(self, a: Answer) -> float | None:
        said = words(a.prediction)
        if not said:
            return None
        seen = set(words(a.input))
        return sum(w in seen for w in said) / len(said)
