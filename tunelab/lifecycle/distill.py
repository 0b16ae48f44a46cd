"""Distillation: a deployment's logged inputs, labelled by a teacher, become a dataset version and a
fine-tuned student, which is then measured against its teacher.

    config = DistillConfig(deployment="support@production", teacher="support@v2", name="support-distilled")
    result = distill(ws, config)        # dataset + ft:support-distilled + student vs teacher
    result.dataset, result.candidate, result.agreement, result.comparison

The steps, each a function a Python user can call on its own:

1. `logged_examples`: the successful calls of the deployment in the window (`since`, `until`), one
   example per distinct input (case and whitespace folded), the newest `limit` of them; no calls
   in the window is an error that says so.
2. personal data (`tunelab.lifecycle.pii`): inputs or variables that look like e-mail addresses,
   phone or card numbers, IBANs, IP addresses, or fields named like them, are listed, and the
   command stops until the user chooses `pii="keep"` or `pii="drop"`.
3. `label_examples`: a seeded `holdout` share of the inputs is held back; the teacher (a prompt
   on a strong `openai:` model in practice, a hybrid or an optimized prompt offline) answers all,
   through the response cache. An answer whose confidence (`answer_confidence`: the label margin
   for labels, the mean token probability for JSON and text) is below `min_confidence`, or a JSON
   answer that does not parse, is unsure: left out (`unsure="drop"`)
   or kept and marked (`meta.teacher_unsure`). Feedback counts where people gave it: a correction
   replaces the teacher's label, and a teacher answer equal to an answer the feedback called wrong
   is left out.
4. the dataset version (`train`, `validation`, and `holdout`: the held-back inputs with the
   teacher's answers), with its provenance in the dataset's meta (`distilled`: deployment, window,
   teacher, confidence rule, feedback used, personal data found).
5. `finetune` (`tunelab.finetune`) trains `ft:NAME` on it with the student prompt (default: the
   prompt the deployment answers with).
6. `judge_student`: the student evaluated on `holdout` (its accuracy there is its agreement with the
   teacher on held-back live traffic), and, with `eval_data`, student and teacher compared on a
   labelled split (`tunelab.compare`: intervals, paired test, cost).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunelab.compare import compare
from tunelab.datasets import Example, get_dataset, normalize_input, save_dataset, validate_name
from tunelab.errors import NotFound, UserError, pydantic_message
from tunelab.evaluate import DEFAULT_BATCH, ResponseCache, RunResult, evaluate, read_hybrid, resolve_candidate
from tunelab.finetune import FineTuneConfig, finetune
from tunelab.lifecycle.calls import answer_confidence, call_input, count_calls, feedback_for, list_calls
from tunelab.lifecycle.evidence import same_answer
from tunelab.lifecycle.pii import PiiReport, find_pii
from tunelab.lifecycle.rollouts import get_rollout, unit_hash
from tunelab.metrics import parse_json
from tunelab.models.finetuned import read_finetuned
from tunelab.prompts import load_prompt

if TYPE_CHECKING:
    from tunelab.compare import Comparison
    from tunelab.workspace import Workspace

QUICK = {"max_steps": 10, "epochs": 1, "max_val_examples": 8, "patience": None}  # --quick: a smoke run of the loop


class DistillConfig(BaseModel):
    """What `tunelab distill` takes (flags), checked before any work."""

    model_config = ConfigDict(extra="forbid")
    deployment: str = Field(description="the deployment whose logged inputs are distilled (--from)")
    teacher: str = Field(description="the candidate that labels them: PROMPT@VERSION, ft:NAME, hybrid:NAME")
    name: str = Field(description="the dataset and the student: dataset NAME, model ft:NAME")
    since: datetime | None = Field(None, description="only calls from this time (UTC)")
    until: datetime | None = Field(None, description="only calls before this time (UTC)")
    limit: int | None = Field(None, ge=1, description="at most this many distinct inputs (the newest)")
    prompt: str | None = Field(None, description="the student's prompt (default: the one the deployment answers with)")
    min_confidence: float = Field(0.0, ge=0, le=1, description="teacher answers less sure than this (label margin, or mean token probability) are unsure")
    unsure: Literal["drop", "mark"] = Field("drop", description="unsure teacher answers: left out, or kept and marked")
    holdout: float = Field(0.2, ge=0, lt=1, description="share of the inputs held back to measure agreement")
    validation: float = Field(0.15, ge=0, lt=1, description="share of the rest used for validation while training")
    pii: Literal["ask", "keep", "drop"] = Field("ask", description="inputs that look like personal data: stop and list them, keep them, or drop them")
    use_feedback: bool = Field(True, description="corrections replace teacher labels; answers marked wrong are left out")
    eval_data: str | None = Field(None, description="a labelled split (NAME[@VERSION][:SPLIT]) to compare student and teacher on")
    train: bool = Field(True, description="fine-tune the student (False: only write the dataset)")
    quick: bool = Field(False, description="a short fine-tune (a smoke run, not a good student)")
    finetune: dict[str, Any] = Field(default_factory=dict, description="more fine-tuning settings (FineTuneConfig fields)")


@dataclass
class Labelled:
    """The teacher's answers on the logged inputs, with what was kept out and why."""

    train: list[Example]
    holdout: list[Example]
    unsure: int = 0
    corrections: int = 0
    wrong_dropped: int = 0


@dataclass
class DistillResult:
    """What `distill` made: the dataset, the student, and how the student compares."""

    dataset: str  # NAME@VERSION
    provenance: dict[str, Any]
    student: str | None = None  # ft:NAME (None: not trained)
    finetune: Any = None  # FineTuneResult
    agreement: RunResult | None = None  # the student on the holdout split (teacher labels)
    comparison: "Comparison | None" = None  # student vs teacher on eval_data
    notes: list[str] = field(default_factory=list)

    @property
    def candidate(self) -> str | None:
        return self.student

    def to_dict(self) -> dict[str, Any]:
        out = {"dataset": self.dataset, "provenance": self.provenance, "student": self.student, "notes": self.notes}
        if self.agreement is not None:
            m = self.agreement.metrics[self.agreement.primary_metric]
            out["agreement"] = {"run": self.agreement.id, "metric": self.agreement.primary_metric, **m}
        if self.comparison is not None:
            out["comparison"] = {"id": self.comparison.id, "report": self.comparison.report,
                                 "metric": self.comparison.metric,
                                 "candidates": {c.name: c.metric.model_dump() for c in self.comparison.candidates}}
        return out


def _window(config: DistillConfig) -> str:
    a = config.since.isoformat(sep=" ", timespec="minutes") if config.since else "the first call"
    b = config.until.isoformat(sep=" ", timespec="minutes") if config.until else "now"
    return f"from {a} until {b} (UTC)"


def logged_examples(ws: "Workspace", config: DistillConfig) -> tuple[list[Example], int]:
    """(one example per distinct logged input of the window, the number of calls they came from)."""
    rows = list_calls(ws, config.deployment, limit=None, status="ok", since=config.since, until=config.until)
    if not rows:
        total = count_calls(ws, config.deployment)
        where = f"in the window {_window(config)}" if (config.since or config.until) and total else "at all"
        raise UserError(f"deployment '{config.deployment}' has no successful calls {where}"
                        + (f" ({total} calls outside it; widen --since/--until)" if total and where != "at all" else
                           ": nothing to distill (serve it and send calls first; see tunelab logs list)"))
    seen: dict[str, Example] = {}
    fb = feedback_for(ws, [r.call_id for r in rows]) if config.use_feedback else {}
    for r in rows:  # newest first
        text = call_input(r)
        key = normalize_input(text)
        if not key or key in seen:
            continue
        meta = {k: v for k, v in (r.variables or {}).items() if k != "input"}
        f = fb.get(r.call_id)
        if f is not None:
            meta["_feedback"] = {"answer": r.output, **f.to_dict(brief=True)}
        seen[key] = Example(input=text, output="", meta={**meta, "call_id": r.call_id})
        if config.limit and len(seen) >= config.limit:
            break
    return list(reversed(seen.values())), len(rows)


def student_prompt(ws: "Workspace", config: DistillConfig) -> str:
    """The prompt the student is trained (and served) with: the flag, else the deployment's."""
    if config.prompt:
        return config.prompt
    answering = get_rollout(ws, config.deployment).answering
    if answering.startswith("ft:"):
        return read_finetuned(ws, answering[3:]).prompt
    if answering.startswith("hybrid:"):
        return student_prompt(ws, config.model_copy(update={"deployment": read_hybrid(ws, answering[7:]).fallback}))
    prompt = load_prompt(ws, answering)
    return f"{prompt.name}@{prompt.version}"


def label_examples(ws: "Workspace", config: DistillConfig, examples: list[Example],
                   log: Callable[[str], None] = lambda _m: None) -> Labelled:
    """The teacher's answers, the holdout held back, unsure answers and feedback applied."""
    teacher = resolve_candidate(ws, config.teacher, free_text=False).with_cache(ResponseCache(ws))
    comps = []
    for start in range(0, len(examples), DEFAULT_BATCH):
        comps += teacher.predict(examples[start:start + DEFAULT_BATCH], 0)
        log(f"teacher {config.teacher}: {len(comps)}/{len(examples)} inputs labelled")
    out = Labelled([], [])
    for ex, comp in zip(examples, comps):
        meta = {k: v for k, v in ex.meta.items() if k != "_feedback"}
        fb = ex.meta.get("_feedback") or {}
        sure = answer_confidence(comp)
        unsure = ((sure is not None and sure < config.min_confidence)
                  or (teacher.output.type == "json" and not parse_json(comp.text)[0]))
        meta["teacher"] = {"answer": comp.text, **({"confidence": sure} if sure is not None else {})}
        output = comp.text
        if "correction" in fb:
            output, unsure = fb["correction"], False
            meta["teacher"]["corrected_by_feedback"] = True
            out.corrections += 1
        elif fb.get("score") is not None and fb["score"] < 0.5 and same_answer(comp.text, fb.get("answer")):
            out.wrong_dropped += 1  # the teacher repeats an answer people called wrong
            continue
        held = config.holdout > 0 and unit_hash("holdout\0" + normalize_input(ex.input)) < config.holdout
        if held:  # every held-back input counts for agreement, sure or not
            out.holdout.append(Example(ex.input, output, {**meta, **({"teacher_unsure": True} if unsure else {})}))
            continue
        if unsure:
            out.unsure += 1
            if config.unsure == "drop":
                continue
            meta["teacher_unsure"] = True
        out.train.append(Example(ex.input, output, meta))
    return out


def distilled_dataset(ws: "Workspace", config: DistillConfig,
                      log: Callable[[str], None] = lambda _m: None) -> tuple[str, dict[str, Any]]:
    """Steps 1-4: the dataset version (NAME@VERSION) and its provenance."""
    validate_name(config.name, "dataset")
    examples, n_calls = logged_examples(ws, config)
    log(f"{n_calls} calls of {config.deployment} {_window(config)}: {len(examples)} distinct inputs")
    pii: PiiReport = find_pii(examples)
    if pii.found:
        if config.pii == "ask":
            raise UserError(f"{len(pii.flagged)} of the {len(examples)} logged inputs look like personal data "
                            f"({pii.summary()}): review them (tunelab logs list --deployment {config.deployment}), "
                            "then pass --pii keep to train on them as they are, or --pii drop to leave them out")
        if config.pii == "drop":
            flagged = set(pii.flagged)
            examples = [ex for i, ex in enumerate(examples) if i not in flagged]
            log(f"left out {len(flagged)} inputs that look like personal data ({pii.summary()})")
            if not examples:
                raise UserError("every logged input looks like personal data: nothing left to distill")
    labelled = label_examples(ws, config, examples, log)
    n_val = int(round(len(labelled.train) * config.validation)) if len(labelled.train) >= 10 else 0
    val_ids = set(sorted(range(len(labelled.train)),
                         key=lambda i: unit_hash("validation\0" + labelled.train[i].input))[:n_val])
    splits = {"train": [ex for i, ex in enumerate(labelled.train) if i not in val_ids],
              "validation": [ex for i, ex in enumerate(labelled.train) if i in val_ids],
              "holdout": labelled.holdout}
    if not splits["train"]:
        raise UserError(f"no training examples left: {labelled.unsure} teacher answers were unsure "
                        f"(--min-confidence {config.min_confidence}), {labelled.wrong_dropped} repeated answers "
                        "marked wrong, the rest held back; lower --min-confidence, pass --unsure mark, or widen the window")
    teacher_fp = resolve_candidate(ws, config.teacher, free_text=False).fingerprint
    provenance = {
        "deployment": config.deployment, "since": config.since.isoformat() if config.since else None,
        "until": config.until.isoformat() if config.until else None, "calls": n_calls,
        "distinct_inputs": len(examples), "teacher": config.teacher, "teacher_fingerprint": teacher_fp,
        "min_confidence": config.min_confidence, "unsure": {"action": config.unsure, "count": labelled.unsure},
        "feedback": {"used": config.use_feedback, "corrections": labelled.corrections,
                     "wrong_dropped": labelled.wrong_dropped},
        "pii": {**pii.to_dict(), "action": config.pii if pii.found else None},
        "splits": {k: len(v) for k, v in splits.items()},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    ds = save_dataset(ws, config.name, splits, meta={"distilled": provenance},
                      source=f"distilled from {config.deployment} by {config.teacher} ({_window(config)})")
    log(f"dataset {ds.ref}: train {len(splits['train'])}, validation {len(splits['validation'])}, "
        f"holdout {len(splits['holdout'])}; {labelled.unsure} unsure teacher answers "
        f"{'left out' if config.unsure == 'drop' else 'marked'}, {labelled.corrections} corrections from feedback")
    return ds.ref, provenance


def judge_student(ws: "Workspace", dataset: str, student: str, config: DistillConfig, *, progress: Any = False,
                  log: Callable[[str], None] = lambda _m: None) -> tuple[RunResult | None, "Comparison | None", list[str]]:
    """Step 6: the student's agreement with the teacher on the held-back traffic, and student vs
    teacher on `config.eval_data` (when given)."""
    notes: list[str] = []
    agreement = None
    if get_dataset(ws, dataset).splits.get("holdout"):
        agreement = evaluate(ws, resolve_candidate(ws, student), f"{dataset}:holdout", progress=progress)
        m = agreement.metrics[agreement.primary_metric]
        log(f"{student} agrees with {config.teacher} on {m['value']:.1%} of the held-back calls "
            f"(95% CI {m['lo']:.1%}–{m['hi']:.1%}, n={m['n']})")
    else:
        notes.append("no held-back calls (--holdout 0 or too few inputs): agreement not measured")
    comparison = None
    if config.eval_data:
        comparison = compare(ws, config.eval_data, [config.teacher, student], progress=progress, log=log)
    else:
        notes.append("pass --eval-data NAME:SPLIT to compare student and teacher on a labelled split")
    return agreement, comparison, notes


def distill(ws: "Workspace", config: DistillConfig, *, progress: Any = False,
            log: Callable[[str], None] = lambda _m: None) -> DistillResult:
    """Steps 1-6 (see the module's docstring)."""
    if config.eval_data:
        get_dataset(ws, config.eval_data)  # a typo fails before any work
    prompt = student_prompt(ws, config)
    load_prompt(ws, prompt)
    dataset, provenance = distilled_dataset(ws, config, log)
    result = DistillResult(dataset, provenance)
    if not config.train:
        result.notes.append(f"not trained: tunelab finetune --data {dataset} --prompt {prompt} --name {config.name}")
        return result
    settings = {**(QUICK if config.quick else {}), **config.finetune, "data": dataset, "prompt": prompt,
                "name": config.name}
    try:
        ft_config = FineTuneConfig(**settings)
    except ValidationError as exc:
        raise UserError(f"fine-tuning settings: {pydantic_message(exc, FineTuneConfig)}") from None
    result.finetune = finetune(ws, ft_config, progress=bool(progress), log=log)
    result.student = f"ft:{config.name}"
    result.agreement, result.comparison, result.notes = judge_student(ws, dataset, result.student, config,
                                                                      progress=progress, log=log)
    return result


def distilled_from(ws: "Workspace", dataset: str) -> dict[str, Any]:
    """The provenance of a distilled dataset (NotFound: not one)."""
    meta = get_dataset(ws, dataset).meta or {}
    if "distilled" not in meta:
        raise NotFound(f"dataset '{dataset}' was not made by tunelab distill")
    return meta["distilled"]
