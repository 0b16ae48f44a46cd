"""LLM-as-judge: a model grades answers on a rubric, or picks the better of two, on any backend.

    judge = Judge(load_model("openai:big", ws))                     # rubric: DEFAULT_RUBRIC, scale 1-5
    judge.grade(examples, predictions)        -> [JudgeScore(score=4, normalized=0.75, text="4"), ...]
    report = judge_sample(ws, "answers:test", judge)   # grades each example's output; with
    report.mean, report.agreement                       # meta.human_score: Cohen's kappa, MCC
    pairwise(judge, rows_a, rows_b)           -> PairwiseResult (wins of A and B, ties; both orders asked)

As a metric: `--metric judge` (the judge model and rubric of the workspace's tunelab.yaml `judge:`
section, else its default model) or `--metric judge:MODEL` (any model spec). It plugs into
`tunelab.metrics` through the `tunelab.metrics` entry point group, as any plug-in metric does, and
grades a whole batch of answers in one model call. Scores are normalized to 0-1:
(score - low) / (high - low).

How far to trust a judge is itself measured: on a sample whose examples carry a human grade in
`meta.human_score` (on the judge's scale) or `meta.human_label` (pass/fail, good/bad, yes/no, 1/0),
`judge_sample` reports Cohen's kappa (exact grades), quadratic-weighted kappa, and MCC of pass/fail
(a grade at or above the scale's midpoint passes) next to the judge's mean score.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from tunelab import stats as st
from tunelab.canonical import plain
from tunelab.datasets import Example, get_split
from tunelab.errors import UserError
from tunelab.metrics import Answer, Metric
from tunelab.models import load_model
from tunelab.models.base import Request, match_label
from tunelab.prompts import OutputSpec

if TYPE_CHECKING:
    from tunelab.models.base import Model
    from tunelab.prompts import JudgeRubric
    from tunelab.workspace import Workspace

DEFAULT_RUBRIC = ("Grade how well the response answers the input: correct, complete and to the point. "
                  "If a reference answer is given, a response that agrees with it is correct.")
PASS_WORDS = {"pass": True, "good": True, "yes": True, "true": True, "1": True, "correct": True,
              "fail": False, "bad": False, "no": False, "false": False, "0": False, "incorrect": False}


@dataclass
class JudgeScore:
    score: int | None  # on the scale; None when the judge's answer named no grade
    normalized: float | None  # 0-1
    text: str


class Judge:
    """A model with a rubric and a scale (`low`..`high`, integers)."""

    def __init__(self, model: "Model", rubric: str | None = None, low: int = 1, high: int = 5,
                 reference: bool = True):
        if high <= low:
            raise UserError(f"judge scale {low}-{high}: the high end must be above the low end", field="scale")
        self.model = model
        self.rubric = rubric or DEFAULT_RUBRIC
        self.low, self.high = low, high
        self.reference = reference  # show the expected output as a reference answer

    @property
    def grades(self) -> list[str]:
        return [str(g) for g in range(self.low, self.high + 1)]

    def grade_request(self, input: str, response: str, reference: str | None = None) -> Request:
        ref = f"Reference answer:\n{reference}\n\n" if reference and self.reference else ""
        text = (f"You are grading a response.\nRubric: {self.rubric}\n\nInput:\n{input}\n\n{ref}"
                f"Response:\n{response}\n\nGrade the response from {self.low} (worst) to {self.high} (best). "
                "Answer with the number only.")
        return Request(messages=[{"role": "user", "content": text}], max_tokens=4, temperature=0.0,
                       labels=self.grades)

    def grade(self, examples: Sequence["Example"], responses: Sequence[str], *,
              reference: bool = True) -> list[JudgeScore]:
        """One grade per (example, response), in one batch (a remote judge answers concurrently)."""
        requests = [self.grade_request(ex.input, resp, ex.output if reference else None)
                    for ex, resp in zip(examples, responses)]
        out = []
        for comp in self.model.complete(requests) if requests else []:
            label = match_label(comp.text, self.grades)
            if label is None:
                out.append(JudgeScore(None, None, comp.text))
            else:
                out.append(JudgeScore(int(label), (int(label) - self.low) / (self.high - self.low), comp.text))
        return out

    def prefer_request(self, input: str, first: str, second: str, reference: str | None = None) -> Request:
        ref = f"Reference answer:\n{reference}\n\n" if reference and self.reference else ""
        text = (f"Compare two responses.\nRubric: {self.rubric}\n\nInput:\n{input}\n\n{ref}"
                f"Response A:\n{first}\n\nResponse B:\n{second}\n\n"
                "Which response is better? Answer A, B, or tie.")
        return Request(messages=[{"role": "user", "content": text}], max_tokens=4, temperature=0.0,
                       labels=["A", "B", "tie"])


# -- the metric ------------------------------------------------------------------------------------

class JudgeMetric(Metric):
    """`judge` / `judge:MODEL`: the judge's normalized grade of each prediction, averaged."""

    binary = False
    percent = True

    def __init__(self, name: str, judge: Judge):
        self.name = name
        self.judge = judge

    def score(self, answer: Answer) -> float | None:
        return self.score_many([answer])[0]

    def score_many(self, answers: list[Answer]) -> list[float | None]:
        """One batched call to the judge model for all the answers (a stored row without its
        example is graded against its expected output)."""
        examples = [a.example if a.example is not None else Example(input="", output=a.expected) for a in answers]
        return [g.normalized for g in self.judge.grade(examples, [a.prediction for a in answers])]

    def details(self, answers: list[Answer]) -> dict | None:
        return {"judge": self.judge.model.name, "scale": [self.judge.low, self.judge.high],
                "rubric": self.judge.rubric}


def make_judge(spec: str | None, ws: "Workspace | None" = None, rubric: "JudgeRubric | None" = None) -> Judge:
    """The judge named by a metric spec: `judge` (the `judge:` section of `ws`'s tunelab.yaml,
    else its default model) or `judge:MODEL`. Without a workspace: the bundled model, default rubric.
    `rubric` (a prompt's `output.judge`) sets the rubric, the scale and, unless `spec` names one,
    the model."""
    settings = ws.config.judge if ws is not None else None
    if rubric is not None:
        model = spec or rubric.model or (settings.model if settings is not None and settings.model else None)
        model = model or (ws.config.default_model if ws is not None else "smollm2-135m")
        return Judge(load_model(model, ws), rubric.rubric, rubric.scale[0], rubric.scale[1])
    model = spec or (settings.model if settings is not None and settings.model else None)
    if model is None:
        model = ws.config.default_model if ws is not None else "smollm2-135m"
    if settings is not None:
        return Judge(load_model(model, ws), settings.rubric, settings.scale[0], settings.scale[1])
    return Judge(load_model(model, ws))


def judge_metric(name: str, output: "OutputSpec | None" = None, workspace: "Workspace | None" = None) -> JudgeMetric:
    """The metric `judge` or `judge:MODEL` (the `tunelab.metrics` entry point). A prompt whose
    output has a `judge:` rubric is graded on that rubric and scale."""
    spec = name.split(":", 1)[1] if ":" in name else None
    rubric = output.judge if output is not None else None
    return JudgeMetric(name, make_judge(spec or None, workspace, rubric))


# -- agreement with humans -------------------------------------------------------------------------

def cohen_kappa(a: Sequence[Any], b: Sequence[Any], categories: Sequence[Any] | None = None,
                weights: str | None = None) -> float:
    """Cohen's kappa of two raters (`weights`: None, or "quadratic" for ordered categories)."""
    if len(a) != len(b):
        raise ValueError("raters must grade the same items")
    if not a:
        return float("nan")
    cats = list(categories) if categories is not None else sorted(set(a) | set(b))
    index = {c: i for i, c in enumerate(cats)}
    k = len(cats)
    observed = [[0.0] * k for _ in range(k)]
    for x, y in zip(a, b):
        observed[index[x]][index[y]] += 1
    n = len(a)
    rows = [sum(r) for r in observed]
    cols = [sum(observed[i][j] for i in range(k)) for j in range(k)]

    def w(i: int, j: int) -> float:  # disagreement weight
        if weights == "quadratic":
            return ((i - j) / (k - 1)) ** 2 if k > 1 else 0.0
        return 0.0 if i == j else 1.0

    obs = sum(w(i, j) * observed[i][j] for i in range(k) for j in range(k)) / n
    exp = sum(w(i, j) * rows[i] * cols[j] for i in range(k) for j in range(k)) / (n * n)
    if exp == 0:
        return 1.0 if obs == 0 else float("nan")
    return 1.0 - obs / exp


def mcc(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Matthews correlation of two binary raters (nan when one rater never varies)."""
    tp = sum(x and y for x, y in zip(a, b))
    tn = sum((not x) and (not y) for x, y in zip(a, b))
    fp = sum((not x) and y for x, y in zip(a, b))
    fn = sum(x and (not y) for x, y in zip(a, b))
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den else float("nan")


def human_grade(example: "Example", judge: Judge) -> tuple[int | None, bool | None]:
    """(grade on the judge's scale, pass) from `meta.human_score` / `meta.human_label`."""
    meta = example.meta or {}
    if meta.get("human_score") is not None:
        try:
            value = float(meta["human_score"])
        except (TypeError, ValueError):
            raise UserError(f"meta.human_score must be a number on the judge's scale "
                            f"{judge.low}-{judge.high} (got {meta['human_score']!r})") from None
        if not judge.low <= value <= judge.high or value != int(value):
            raise UserError(f"meta.human_score {meta['human_score']!r} is not a whole grade from "
                            f"{judge.low} to {judge.high}")
        return int(value), value >= (judge.low + judge.high) / 2
    if meta.get("human_label") is not None:
        word = str(meta["human_label"]).strip().lower()
        if word not in PASS_WORDS:
            raise UserError(f"meta.human_label {meta['human_label']!r}: expected one of "
                            f"{', '.join(sorted(PASS_WORDS))}")
        return None, PASS_WORDS[word]
    return None, None


@dataclass
class JudgeReport:
    judge: str
    data: str
    n: int
    n_graded: int  # the judge named a grade
    mean: float  # normalized 0-1
    lo: float
    hi: float
    scale: list[int]
    agreement: dict[str, Any] = field(default_factory=dict)  # n, exact, kappa, weighted_kappa, mcc
    grades: list[int | None] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return plain(asdict(self))


def agreement(judge: Judge, examples: Sequence["Example"], scores: Sequence[JudgeScore]) -> dict[str, Any]:
    """The judge against the human grades the examples carry (empty when none carry one)."""
    pairs, passes = [], []
    for ex, s in zip(examples, scores):
        grade, ok = human_grade(ex, judge)
        if s.score is None:
            continue
        if grade is not None:
            pairs.append((grade, s.score))
        if ok is not None:
            passes.append((ok, s.score >= (judge.low + judge.high) / 2))
    if not pairs and not passes:
        return {}
    result: dict[str, Any] = {"n": max(len(pairs), len(passes))}
    if pairs:
        cats = list(range(judge.low, judge.high + 1))
        human, machine = [p[0] for p in pairs], [p[1] for p in pairs]
        result.update(exact=sum(h == m for h, m in pairs) / len(pairs),
                      kappa=cohen_kappa(human, machine, cats),
                      weighted_kappa=cohen_kappa(human, machine, cats, weights="quadratic"),
                      spearman=spearman(human, machine))
    if passes:
        result.update(pass_agreement=sum(h == m for h, m in passes) / len(passes),
                      mcc=mcc([p[0] for p in passes], [p[1] for p in passes]),
                      pass_kappa=cohen_kappa([p[0] for p in passes], [p[1] for p in passes], [False, True]))
    result["trust"] = trust(result)
    return result


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two raters (nan when one never varies)."""
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


# Landis & Koch's reading of kappa: below 0.2 slight, 0.2-0.4 fair, 0.4-0.6 moderate, 0.6-0.8 substantial
TRUST_LEVELS = ((0.8, "almost perfect"), (0.6, "substantial"), (0.4, "moderate"), (0.2, "fair"), (-1.0, "slight"))


def trust(agreement: dict[str, Any]) -> str:
    """How far the judge can be trusted, in words, from its agreement with the human grades."""
    value = next((agreement[k] for k in ("weighted_kappa", "pass_kappa")
                  if agreement.get(k) is not None and agreement[k] == agreement[k]), None)
    n = agreement.get("n", 0)
    if value is None:
        return f"unknown: the judge's grades do not vary over the {n} human-graded examples"
    level = next(name for floor, name in TRUST_LEVELS if value >= floor)
    use = ("use its scores" if value >= 0.6 else "use its scores only beside the reference metrics"
           if value >= 0.4 else "do not rely on its scores")
    return f"{level} agreement with humans (kappa {value:.2f} on {n} examples): {use}"


def judge_sample(ws: "Workspace", data: str, judge: Judge, *, limit: int | None = None) -> JudgeReport:
    """Grade every example's `output` (the answer under review) of `data` and, where the examples
    carry human grades, the judge's agreement with them."""
    ds, split, examples = get_split(ws, data)
    examples = list(examples)[:limit] if limit else list(examples)
    if not examples:
        raise UserError(f"split '{split}' of dataset '{ds.name}' has no examples")
    for ex in examples:  # bad human grades are errors before any judge call
        human_grade(ex, judge)
    scores = judge.grade(examples, [ex.output for ex in examples], reference=False)
    values = [s.normalized for s in scores if s.normalized is not None]
    mean, lo, hi = _mean_interval(values)
    return JudgeReport(judge=judge.model.name, data=f"{ds.name}@{ds.version}:{split}", n=len(examples),
                       n_graded=len(values), mean=mean, lo=lo, hi=hi, scale=[judge.low, judge.high],
                       agreement=agreement(judge, examples, scores), grades=[s.score for s in scores])


def _mean_interval(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return float("nan"), float("nan"), float("nan")
    s = np.column_stack([values, np.ones(len(values))])
    lo, hi = st.bootstrap(s, lambda sums, n: sums[..., 0] / sums[..., 1])
    return float(np.mean(values)), float(lo), float(hi)


# -- pairwise preference -----------------------------------------------------------------------------

@dataclass
class PairwiseResult:
    judge: str
    a: str
    b: str
    n: int
    a_wins: int
    b_wins: int
    ties: int
    position_flips: int  # the judge's choice changed when the order was swapped (counted as ties)
    a_win_rate: float  # (wins + ties / 2) / n
    verdicts: list[str] = field(default_factory=list)  # per example: A | B | tie

    def to_dict(self) -> dict[str, Any]:
        return plain(asdict(self))


def pairwise(judge: Judge, rows_a: Sequence[Any], rows_b: Sequence[Any], a: str = "A", b: str = "B", *,
             limit: int | None = None) -> PairwiseResult:
    """Which of two runs' answers the judge prefers, example by example: `rows_a`/`rows_b` are the
    stored rows of two runs on the same split (`tunelab.evaluate.paired_rows`); the first repeat of
    each example both answered. Each pair is asked in both orders; a choice that flips with the
    order is a tie. `a`/`b` name the runs in the result."""
    by_a = {r.example_index: r for r in rows_a if r.repeat_index == 0}
    by_b = {r.example_index: r for r in rows_b if r.repeat_index == 0}
    common = sorted(set(by_a) & set(by_b))[:limit] if limit else sorted(set(by_a) & set(by_b))
    if not common:
        raise UserError(f"runs {a} and {b} share no answered examples")
    rows_a, rows_b = by_a, by_b
    requests = []
    for i in common:
        x, y = rows_a[i], rows_b[i]
        requests.append(judge.prefer_request(x.input, x.prediction, y.prediction, x.expected))
        requests.append(judge.prefer_request(x.input, y.prediction, x.prediction, x.expected))
    comps = judge.model.complete(requests)
    verdicts, flips = [], 0
    for k in range(len(common)):
        first = match_label(comps[2 * k].text, ["A", "B", "tie"])
        second = match_label(comps[2 * k + 1].text, ["A", "B", "tie"])
        second = {"A": "B", "B": "A"}.get(second, second)  # back to run A / run B
        if first == second and first in ("A", "B"):
            verdicts.append(first)
        else:
            flips += first in ("A", "B") and second in ("A", "B")
            verdicts.append("tie")
    a_wins, b_wins = verdicts.count("A"), verdicts.count("B")
    ties = len(verdicts) - a_wins - b_wins
    return PairwiseResult(judge=judge.model.name, a=a, b=b, n=len(common), a_wins=a_wins, b_wins=b_wins,
                          ties=ties, position_flips=flips, a_win_rate=(a_wins + ties / 2) / len(common),
                          verdicts=verdicts)
