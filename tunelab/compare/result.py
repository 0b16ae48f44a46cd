"""The comparison and the advice as typed records: one result type per step.

The JSON twin of a report is `Comparison.model_dump(mode="json")`; the HTML report, the terminal
table, the web console and `--json` all read these same fields, so a key cannot be spelled two
ways. Schema "tunelab.comparison/2":

    Comparison
      id, created_at, report (path of the HTML report)
      dataset: {name, version, split, n_examples, labels}
      metric (the primary metric, higher is better), volume_per_month, months, engineer_hourly_rate, repeat
      best (the candidate with the highest metric)
      candidates: [CandidateEntry]
        name, kind (prompt | ft | hybrid | baseline), model, local, run_id, reused_run, n, eval_wall_s
        metric: {value, low, high} (95% interval), metrics: {name: {value, low, high}}
        vs_best: {other, test, p_value, difference, significant} | null
        consistency: {repeat, agreement, pass_k, format_validity, note}
        tokens: {prompt, completion, total} (mean per request)
        latency: {p50, p95, mean, throughput_per_s, samples}
        setup: {how, wall_s, compute_cost, tokens, examples, sources, engineer_hours, engineer_cost, total_cost}
        cost_per_request, cost_per_1k, cost_horizon (over `months` at the expected volume)
        flexibility: {change_s, how}
        confusion: {labels, matrix (rows: expected)} | null
        training_curves: {train_loss, val_loss, val_metric, x_label} | null
        routing: {primary, fallback, reasons, n} | null  (a hybrid's traffic share)
        examples_trained: int | null
        per_field: {field: {precision, recall, f1, support}} | null   (JSON outputs)
        scores: [float]   (the primary metric of each example: its distribution)
      pairwise: [{a, b, test, p_value, difference, diff_low, diff_high, n, significant, verdict}]   (a − b)
      break_even: [{a, b, volume_per_month, payback_months}]   (a: the higher setup cost)
      learning_curve: {candidate, metric, points: [{fraction, n_train, candidate, metric, wall_s, cost, run_id}],
                       series: [{candidate, kind, points}], crossover: {n_train, prompting, trained, text} | null} | null
      recommendation: Advice | null
      output_type: label | json | text
      outputs: [{index, input, reference, references, answers: {candidate: {text, score}}, spread}]
               (JSON and text: the examples where the candidates disagree most, first)

    Advice
      recommendation (prompt | ft | hybrid | none: the candidate kind, or none), candidate, headline,
      reasons, contenders, excluded: [{candidate, rule, reason}], rules, metric, volume_per_month,
      months, constraints
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.evaluate import Setup

SCHEMA = "tunelab.comparison/2"
Kind = Literal["prompt", "ft", "hybrid", "baseline"]


class Record(BaseModel):
    """A part of a comparison: unknown keys are errors, so a field cannot drift into a twin."""

    model_config = ConfigDict(extra="forbid")


class Interval(Record):
    value: float | None = None
    low: float | None = None
    high: float | None = None


class PairTest(Record):
    """A paired test of candidate `a` against `b` on the same examples: difference = a − b."""

    a: str
    b: str
    test: str  # mcnemar | paired bootstrap
    p_value: float | None = None
    difference: float | None = None
    diff_low: float | None = None
    diff_high: float | None = None
    n: int = 0
    significant: bool = False
    verdict: str = ""


class VsBest(Record):
    other: str
    test: str
    p_value: float | None = None
    difference: float | None = None  # this candidate − the best
    significant: bool = False


class Consistency(Record):
    repeat: int = 1
    agreement: float | None = None
    pass_k: float | None = None
    format_validity: float | None = None
    note: str | None = None


class Tokens(Record):
    prompt: float = 0.0
    completion: float = 0.0
    total: float = 0.0


class Latency(Record):
    p50: float | None = None
    p95: float | None = None
    mean: float | None = None
    throughput_per_s: float | None = None
    samples: list[float] = Field(default_factory=list)


class SetupCost(Setup):
    """A candidate's setup (`tunelab.evaluate.Setup`) with the engineer time and the total."""

    model_config = ConfigDict(extra="forbid")
    engineer_hours: float = 0.0
    engineer_cost: float = 0.0
    total_cost: float = 0.0


class Flexibility(Record):
    change_s: float = 0.0
    how: str = ""


class Confusion(Record):
    labels: list[str]
    matrix: list[list[int]]


class TrainingCurves(Record):
    train_loss: list[list[float]] = Field(default_factory=list)
    val_loss: list[list[float]] = Field(default_factory=list)
    val_metric: list[list[float]] = Field(default_factory=list)
    x_label: str = "epoch"


class SearchTrial(Record):
    """One trial of the hyperparameter search that made a fine-tune (`tunelab finetune --search`)."""

    number: int
    state: str  # complete | pruned | fail
    value: float | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    curve: list[list[float]] = Field(default_factory=list)  # [validation index, score]
    finetune: str | None = None
    wall_s: float = 0.0


class Search(Record):
    best_trial: int
    trials: list[SearchTrial] = Field(default_factory=list)


class TrafficShare(Record):
    """Who answered a hybrid's requests: shares of the primary and the fallback, and why."""

    primary: float
    fallback: float
    reasons: dict[str, float] = Field(default_factory=dict)
    n: int = 0


class FieldScore(Record):
    """One JSON field's agreement with the expected objects."""

    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    support: int = 0


class Answered(Record):
    """One candidate's answer to one example in the side-by-side outputs."""

    text: str
    score: float | None = None  # the primary metric of this answer


class OutputRow(Record):
    """One test example with every candidate's answer (generative outputs: the report's output
    matrix, the examples where the candidates disagree most first)."""

    index: int
    input: str
    reference: str
    references: list[str] = Field(default_factory=list)  # every reference, when the data has several
    answers: dict[str, Answered] = Field(default_factory=dict)  # by candidate name
    spread: float = 0.0  # best minus worst score of the candidates on this example


class CandidateEntry(Record):
    name: str
    kind: Kind
    model: str = ""
    base: str = ""  # the base model under it: a prompt's model, a fine-tune's base, a hybrid's primary's
    local: bool = True
    run_id: str = ""
    reused_run: bool = False
    n: int = 0
    eval_wall_s: float = 0.0
    metric: Interval = Field(default_factory=Interval)
    metrics: dict[str, Interval] = Field(default_factory=dict)
    vs_best: VsBest | None = None
    consistency: Consistency = Field(default_factory=Consistency)
    tokens: Tokens = Field(default_factory=Tokens)
    latency: Latency = Field(default_factory=Latency)
    setup: SetupCost = Field(default_factory=SetupCost)
    cost_per_request: float = 0.0
    cost_per_1k: float = 0.0
    cost_horizon: float = 0.0
    flexibility: Flexibility = Field(default_factory=Flexibility)
    confusion: Confusion | None = None
    training_curves: TrainingCurves | None = None
    search: Search | None = None  # the hyperparameter search that made a fine-tune
    routing: TrafficShare | None = None
    examples_trained: int | None = None
    estimated_from_learning_curve: int | None = None  # advise: the learning-curve point standing in
    per_field: dict[str, FieldScore] | None = None  # JSON outputs: agreement per field
    scores: list[float] = Field(default_factory=list)  # the primary metric per example (its distribution)


class BreakEven(Record):
    a: str  # the higher setup cost and the cheaper requests
    b: str
    volume_per_month: float
    payback_months: float | None = None


class LearningCurvePoint(Record):
    fraction: float
    n_train: int | None = None
    candidate: str
    metric: Interval
    wall_s: float = 0.0
    cost: float = 0.0
    run_id: str = ""


class CurveSeries(Record):
    """One trainable candidate measured on growing shares of train (its own points)."""

    candidate: str
    kind: str  # ft | baseline | prompt (a prompt with per-input demos: its demo pool limited to n)
    points: list[LearningCurvePoint] = Field(default_factory=list)


class Crossover(Record):
    """Where the prompting curve and the best trained curve cross (n_train None: not in the
    measured range), in words."""

    n_train: float | None = None
    prompting: str = ""  # the prompt candidate compared
    trained: str = ""  # the trained candidate that overtakes it
    text: str = ""


class LearningCurve(Record):
    """The data-requirements row: the fine-tune's curve (`candidate`, `points`; empty when it was
    not measured), every other trainable candidate's (`series`), and the crossover point."""

    candidate: str
    metric: str
    points: list[LearningCurvePoint] = Field(default_factory=list)
    series: list[CurveSeries] = Field(default_factory=list)
    crossover: Crossover | None = None
    n_eval: int | None = None  # the test examples each point was measured on (None: not recorded)
    left_out: list[str] = Field(default_factory=list)  # the series a time budget left out, each in words


class JudgeTrust(Record):
    """How far the judge behind a `judge` metric can be trusted: its agreement with human grades."""
    judge: str
    sample: str | None = None  # the human-graded split, DATASET@VERSION:SPLIT; None: not measured
    n: int = 0
    weighted_kappa: float | None = None
    spearman: float | None = None
    pass_kappa: float | None = None
    trust: str


class DatasetRef(Record):
    name: str
    version: str
    split: str
    n_examples: int
    labels: list[str] | None = None


class Excluded(Record):
    candidate: str
    rule: str
    reason: str


class Advice(Record):
    """What to do, with its reasons citing the measured numbers (`tunelab.compare.advise`)."""

    recommendation: Literal["prompt", "ft", "hybrid", "baseline", "none"]
    candidate: str | None = None
    headline: str
    reasons: list[str] = Field(default_factory=list)
    contenders: list[str] = Field(default_factory=list)
    excluded: list[Excluded] = Field(default_factory=list)
    rules: str = ""
    metric: str = ""
    volume_per_month: float = 0.0
    months: int = 12
    constraints: dict[str, Any] = Field(default_factory=dict)


class Comparison(Record):
    schema_: str = Field(SCHEMA, alias="schema")
    id: str
    created_at: str
    report: str | None = None
    dataset: DatasetRef
    metric: str
    volume_per_month: float
    months: int
    engineer_hourly_rate: float = 0.0
    repeat: int = 1
    best: str
    candidates: list[CandidateEntry]
    pairwise: list[PairTest] = Field(default_factory=list)
    break_even: list[BreakEven] = Field(default_factory=list)
    learning_curve: LearningCurve | None = None
    recommendation: Advice | None = None
    output_type: Literal["label", "json", "text"] = "label"
    outputs: list[OutputRow] = Field(default_factory=list)  # generative outputs: the side-by-side matrix
    judge: JudgeTrust | None = None  # a judge metric: how far its grades can be trusted

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def entry(self, name: str) -> CandidateEntry:
        """The candidate called `name`."""
        return next(c for c in self.candidates if c.name == name)

    def pair(self, a: str, b: str) -> PairTest | None:
        """The paired test of `a` against `b`, oriented so that difference = a − b."""
        for t in self.pairwise:
            if (t.a, t.b) == (a, b):
                return t
            if (t.a, t.b) == (b, a):
                flip = -t.difference if t.difference is not None else None
                low = -t.diff_high if t.diff_high is not None else None
                high = -t.diff_low if t.diff_low is not None else None
                return t.model_copy(update={"a": a, "b": b, "difference": flip, "diff_low": low, "diff_high": high})
        return None

    def to_json(self) -> dict[str, Any]:
        """The JSON twin (what report.json holds)."""
        return self.model_dump(mode="json", by_alias=True)
