"""The optimizer: search instructions and few-shot demos on the validation split, keep the winner.

    result = optimize(ws, "support", "support", budget=20, objective="macro_f1")
    result.improved, result.version, result.winner["validation"], result.test

Like a fine-tune, an optimization turns a train/validation split into a candidate, and the one
evaluator (`tunelab.evaluate.evaluate`) scores every candidate it tries — on the **validation**
split only. Demos come from the train split; the proposer's failures come from the train split;
the test split is touched only after the search is over, to report the winner's (and the seed's)
test score separately (`test=False` skips that).

The search, in stages, within the budget (a number of candidates, or seconds):

1. the seed prompt as it is;
2. instruction variants without demos (`tunelab.optimize.space`);
3. the best instructions x demo strategies: 1 and 2 per label (stratified), 4 and 8 at random,
   4 and 8 nearest neighbours per input by TF-IDF, 4 by sentence embeddings;
4. with a proposer model: rewrites of the best instruction from its failures on train examples.

For JSON outputs on a model that can constrain its decoding (`Model.constrains_json`: local,
llamacpp), the best candidate after stage 2 is also tried decoded under the grammar of its schema
(`output.constrained`); when that scores higher, the demo stage keeps it on.

With enough validation examples (90 or more) each stage screens its candidates on the first
third of the validation split and evaluates only the best few on all of it — none whose screen
score is already below the 95% interval of the best so far (successive halving; the response
cache makes the first third free the second time).

The winner: candidates over `max_prompt_tokens` (mean prompt tokens per request) are rejected;
among the fully evaluated candidates whose score lies within the 95% interval of the best one,
the one with the fewest prompt tokens per request wins. If that is the seed prompt, nothing beat
it, and no version is committed. Otherwise the winner is committed as a new version of the prompt
(demos written inline; per-input demos as a selector spec) with its provenance in the commit's
meta, and the whole search — every candidate, the result, wall time, tokens and cost (the setup
cost of prompt engineering in a comparison) — is stored in the `optimizations` table.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Sequence


from tunelab.datasets import Dataset, Example, get_dataset, parse_ref
from tunelab.demos import DemoSelector, DemoSpec, NearestDemos, nearest_index
from tunelab.errors import UserError
from tunelab.evaluate import PromptCandidate, ResponseCache, evaluate, request_cost, run_rows
from tunelab.metrics import make_metric, primary_metric
from tunelab.models import load_model
from tunelab.models.base import Model
from tunelab.optimize.proposer import Failure, propose
from tunelab.optimize.result import OptimizationResult
from tunelab.optimize.space import InstructionVariant, instruction_variants
from tunelab.optimize.trials import (DEFAULT_BUDGET, Budget, Trial, build_prompt, choose_winner, demo_specs,
                                     describe_selector, fmt_interval, has_system_part, outcome, rendered_instruction,
                                     seed_task, trial_line)
from tunelab.prompts import (Prompt, commit_prompt, current_version, load_prompt, parse_prompt, prompt_path,
                             prompt_versions, read_prompt_file)
from tunelab.store.models import OptimizationRow, utcnow

if TYPE_CHECKING:
    from tunelab.prompts import OutputSpec
    from tunelab.workspace import Workspace

SCREEN_MIN_VALIDATION = 90  # screen on a third of validation when it has at least this many examples
PROMOTE = 3  # candidates per stage promoted from the screen to the full validation split
TOP_INSTRUCTIONS = 2  # instructions carried into the demo stage
PROPOSER_ROUNDS = 3
FAILURE_SAMPLE = 32  # train examples the proposer's failures are drawn from
MAX_FAILURES = 6
DEMO_STRATEGIES = ("stratified", "random", "knn_tfidf", "knn_embed")


# -- the search --------------------------------------------------------------------------------

class _Search:
    """The state of one optimization; `optimize()` below reads top to bottom."""

    def __init__(self, ws: "Workspace", seed: "Prompt", model: "Model", model_spec: str, ds: "Dataset",
                 objective: str, budget: Budget, max_prompt_tokens: int | None, limit: int | None,
                 seed_value: int, log: Callable[[str], None], free_text: bool):
        self.ws, self.seed, self.model, self.model_spec, self.ds = ws, seed, model, model_spec, ds
        self.objective, self.budget, self.max_prompt_tokens = objective, budget, max_prompt_tokens
        self.rng_seed, self.log, self.free_text = seed_value, log, free_text
        self.pool = ds.split("train") if "train" in ds.splits else []
        self.validation = ds.split("validation")
        self.n_full = min(len(self.validation), limit) if limit else len(self.validation)
        self.limit = limit
        self.screen_n = self.n_full // 3 if self.n_full >= SCREEN_MIN_VALIDATION else None
        self.labels = list(seed.labels or ds.labels or []) if seed.output.type == "label" else []
        self.trials: list[Trial] = []
        self.seen: dict[str, Trial] = {}  # evaluated (or rejected) trials by key
        self.made: set[str] = set()  # keys of every trial made, to never make one twice
        self.indexes: dict[str, NearestDemos] = {}
        self.data_val = f"{ds.name}@{ds.version}:validation"
        self.on_trial: Callable[[Trial], None] = lambda t: None
        self.notes: list[str] = []
        self.constrain = False  # JSON: every later trial decodes under the schema's grammar
        self.tokens_spent = 0
        self.cost = 0.0

    # -- candidates ------------------------------------------------------------------------
    def make_trial(self, stage: str, variant: InstructionVariant, spec: DemoSpec) -> Trial | None:
        """A trial, or None when the same candidate was tried already or cannot be made."""
        fixed: list[Example] = []
        seed_selector = None  # the seed's own per-input demos, when it has them
        if spec.strategy == "seed":
            demos = self.seed.resolve_demos(self.ws)
            if isinstance(demos, DemoSelector):
                seed_selector = demos
                prompt = self.seed if variant.name == "seed" else build_prompt(
                    self.seed, variant, None, per_input=True).replace(demos=self.seed.demos)
            else:
                fixed = list(demos)
                prompt = self.seed if variant.name == "seed" else build_prompt(self.seed, variant, fixed)
        elif spec.per_input:
            prompt = build_prompt(self.seed, variant, None, per_input=True)
        else:
            fixed = spec.draw(self.pool, self.labels, seed=self.rng_seed)
            if spec.strategy != "none" and not fixed:
                return None
            prompt = build_prompt(self.seed, variant, fixed)
        if self.constrain:  # JSON decoded under the schema's grammar won on the instructions: keep it
            prompt = constrained(prompt)
            variant = InstructionVariant(f"{variant.name} + constrained", variant.text, variant.placement)
        cand_name = f"{self.seed.name}@{prompt.version}" + (f"+{spec.strategy}{spec.k}" if spec.per_input else "")
        kwargs = dict(name=cand_name, model_name=self.model_spec, free_text=self.free_text, workspace=self.ws)
        demos: list[Example] | DemoSelector = fixed
        if spec.per_input:
            method = "tfidf" if spec.strategy == "knn_tfidf" else "embed"
            if method not in self.indexes:  # the index a committed version of this data will use too
                self.indexes[method] = nearest_index(self.ds.name, self.ds.version, "train", self.pool, method)
            demos = DemoSelector(spec.strategy, spec.k, self.ds.name, self.ds.version, "train", self.pool,
                                 index=self.indexes[method])
        elif seed_selector is not None:
            demos = seed_selector
        cand = PromptCandidate(prompt, self.model, demos, **kwargs)
        trial = Trial(0, stage, variant, spec, prompt, fixed, candidate=cand)
        if trial.key() in self.made:
            return None
        self.made.add(trial.key())
        return trial

    def constrained_trial(self, base: Trial) -> Trial | None:
        """`base` decoded under its schema's grammar (a JSON output on a model that can)."""
        prompt = constrained(base.prompt)
        variant = InstructionVariant(f"{base.variant.name} + constrained", base.variant.text, base.variant.placement)
        cand = PromptCandidate(prompt, self.model, base.candidate.demos, name=f"{self.seed.name}@{prompt.version}",
                               model_name=self.model_spec, free_text=self.free_text, workspace=self.ws)
        trial = Trial(0, "constrained", variant, base.demos, prompt, base.fixed_demos, candidate=cand)
        if trial.key() in self.made:
            return None
        self.made.add(trial.key())
        return trial

    def estimate_prompt_tokens(self, trial: Trial) -> float:
        """Mean prompt tokens of the first few validation requests, by the model's tokenizer."""
        sample = self.validation[: min(8, self.n_full)]
        reqs = trial.candidate.requests(sample, 0)
        counts = [sum(self.model.count_tokens(m["content"]) + 4 for m in r.messages) for r in reqs]
        return sum(counts) / max(1, len(counts))

    # -- evaluation ------------------------------------------------------------------------
    def run(self, trial: Trial, n: int, baseline: bool = False) -> bool:
        """Score `trial` on the first `n` validation examples through the evaluator. The
        `baseline` (the seed prompt) is always scored, whatever the budget and its length."""
        if trial.key() not in self.seen:
            if self.budget.exhausted() and not baseline:
                return False
            self.seen[trial.key()] = trial
            self.trials.append(trial)
            trial.id = len(self.trials)
            self.budget.used += 1
            if self.max_prompt_tokens is not None and not baseline:
                est = self.estimate_prompt_tokens(trial)
                if est > self.max_prompt_tokens * 1.1:
                    trial.status, trial.prompt_tokens = "too_long", est
                    trial.note = f"about {est:.0f} prompt tokens per request > {self.max_prompt_tokens}"
                    self.on_trial(trial)
                    return False
        start = time.perf_counter()
        limit = n if n < len(self.validation) else None
        try:
            result = evaluate(self.ws, trial.candidate, self.data_val, limit=limit,
                              metrics=[self.objective], progress=False)
        except UserError as exc:
            trial.status, trial.note = "failed", str(exc)
            self.on_trial(trial)
            return False
        trial.wall_s += time.perf_counter() - start
        trial.run_ids.append(result.id)
        metric = result.metrics.get(self.objective) or {}
        spent_tokens, spent_cost = self.spent(result)
        trial.tokens_spent += spent_tokens
        trial.cost += spent_cost
        self.tokens_spent += spent_tokens
        self.cost += spent_cost
        trial.prompt_tokens = result.tokens.get("prompt")
        trial.completion_tokens = result.tokens.get("completion")
        value = metric.get("value")
        if n >= self.n_full:
            trial.score, trial.lo, trial.hi, trial.n = value, metric.get("lo"), metric.get("hi"), result.rows
            trial.status = "ok"
        else:
            trial.screen_score = value
            trial.status = "screened"
        if value is None:
            trial.status, trial.note = "failed", f"no value for {self.objective}"
        elif self.max_prompt_tokens is not None and (trial.prompt_tokens or 0) > self.max_prompt_tokens:
            trial.status = "ok" if baseline else "too_long"
            trial.note = f"{trial.prompt_tokens:.0f} prompt tokens per request > {self.max_prompt_tokens}"
        self.on_trial(trial)
        return trial.status in ("ok", "screened")

    def spent(self, result) -> tuple[int, float]:
        """Tokens and cost of the requests a run really sent (cache hits and reused runs: none)."""
        if result.reused:
            return 0, 0.0
        tokens, cost = 0, 0.0
        for row in run_rows(self.ws, result.id):
            if not (row.extra or {}).get("cached"):
                tokens += row.prompt_tokens + row.completion_tokens
                cost += row.cost
        return tokens, cost

    def stage(self, trials: Sequence[Trial], promote: int = PROMOTE) -> list[Trial]:
        """Evaluate trials (screen first when validation is large); the fully scored ones."""
        if self.screen_n is None:
            for t in trials:
                if self.budget.exhausted():
                    break
                self.run(t, self.n_full)
            return [t for t in trials if t.status == "ok"]
        screened = []
        for t in trials:
            if self.budget.exhausted():
                break
            if self.run(t, self.screen_n):
                screened.append(t)
        screened.sort(key=lambda t: (-(t.screen_score or 0), t.prompt_tokens or 0))
        # promote the best few, but none that is already clearly below the best so far
        best = self.best()
        floor = best.lo if best is not None and best.lo is not None else float("-inf")
        for t in [t for t in screened if (t.screen_score or 0) >= floor][:promote]:
            if self.budget.seconds is not None and self.budget.elapsed >= self.budget.seconds:
                break
            self.run(t, self.n_full)
        return [t for t in trials if t.status == "ok"]

    def full(self) -> list[Trial]:
        return [t for t in self.trials if t.status == "ok" and t.score is not None]

    def best(self) -> Trial | None:
        done = self.full()
        return max(done, key=lambda t: (t.score, -(t.prompt_tokens or 0), -t.id)) if done else None

    # -- the proposer ----------------------------------------------------------------------
    def failures(self, trial: Trial, seed_value: int):
        shown = {d.input for d in trial.fixed_demos}
        pool = [ex for ex in self.pool if ex.input not in shown]
        sample = random.Random(seed_value).sample(pool, min(FAILURE_SAMPLE, len(pool)))
        worker = trial.candidate.with_cache(ResponseCache(self.ws))
        comps = worker.predict(sample, 0)
        pricing = self.ws.pricing_for(self.model_spec, self.model.backend)
        for comp in comps:
            if not (comp.meta or {}).get("cached"):
                self.tokens_spent += comp.prompt_tokens + comp.completion_tokens
                self.cost += request_cost(pricing, comp)
        wrong = [Failure(ex.input, ex.output, comp.text) for ex, comp in zip(sample, comps)
                 if comp.text.strip() != ex.output.strip()]
        return wrong[:MAX_FAILURES], len(sample)


def constrained(prompt: "Prompt") -> "Prompt":
    """`prompt` with its JSON output decoded under the grammar of its schema."""
    output = prompt.output.model_dump(mode="json", by_alias=True, exclude_none=True)
    return prompt.replace(output={**output, "constrained": True})


def _objective_for(output: "OutputSpec", objective: str | None) -> str:
    name = objective or primary_metric(output)
    make_metric(name, output)  # NotFound if unknown
    return name



def optimize(ws: "Workspace", prompt_ref: str, data_name: str, *, budget: int | str | None = DEFAULT_BUDGET,
             objective: str | None = None, max_prompt_tokens: int | None = None,
             proposer: "str | Model | None" = None, model: "str | Model | None" = None, limit_validation: int | None = None, seed: int = 0,
             demo_strategies: Sequence[str] = DEMO_STRATEGIES, label_definitions: dict[str, str] | None = None,
             test: bool = True, limit_test: int | None = None,
             commit: bool = True, author: str | None = None, progress: bool | Any = True) -> OptimizationResult:
    """Optimize prompt `prompt_ref` on dataset `data_name` (its train and validation splits).

    `budget`: candidates to evaluate (int) or a time ("15m"). `objective`: a metric name (default
    the output type's primary metric: accuracy for labels). `max_prompt_tokens`: reject candidates
    with more prompt tokens per request. `proposer`: a model spec that rewrites the instruction
    from failures. `model`: evaluate on this model instead of the prompt's. `limit_validation`:
    use only the first N validation examples. `label_definitions`: {label: what it means}, for the
    variants that define each label (else they list the names). `test`: after the search, evaluate the seed and the
    winner on the test split (reported apart from validation). `progress`: True prints a line per
    candidate on stderr, a rich Console prints there, False is silent.
    """
    started = time.perf_counter()
    name, version, split = parse_ref(data_name)
    if split:
        raise UserError(f"--data '{data_name}': give the dataset without a split; the optimizer uses its "
                        "train split for demos and its validation split to score candidates (never test)")
    for what, value in (("--max-prompt-tokens", max_prompt_tokens), ("--limit", limit_validation),
                        ("--test-limit", limit_test)):
        if value is not None and value < 1:
            raise UserError(f"{what} must be at least 1 (got {value})")
    unknown = [s for s in demo_strategies if s not in DEMO_STRATEGIES]
    if unknown:
        raise UserError(f"unknown demo strategy '{unknown[0]}' (known: {', '.join(DEMO_STRATEGIES)})")
    plan = Budget.parse(budget)
    seed_prompt = load_prompt(ws, prompt_ref)
    ds = get_dataset(ws, data_name)
    if "validation" not in ds.splits:
        raise UserError(f"dataset '{ds.name}' has no validation split (splits: {', '.join(ds.splits)}); "
                        f"make one with: tunelab data split {ds.name}")
    output_type = seed_prompt.output.type
    if label_definitions:
        unknown_labels = sorted(set(label_definitions) - set(seed_prompt.labels or []))
        if unknown_labels:
            raise UserError(f"label definitions name '{unknown_labels[0]}', which is not a label of prompt "
                            f"'{seed_prompt.name}' (labels: {', '.join(seed_prompt.labels or []) or 'none'})")
    objective = _objective_for(seed_prompt.output, objective)
    if model is not None and not isinstance(model, str):  # a Model object (tests, notebooks)
        llm, model_spec = model, model.name
    else:
        model_spec = model or seed_prompt.model
        llm = load_model(model_spec, ws)
    log = _logger(progress)
    free_text = objective in ("format_valid", "free_accuracy")
    search = _Search(ws, seed_prompt, llm, model_spec, ds, objective, plan, max_prompt_tokens, limit_validation,
                     seed, log, free_text)
    if not search.pool:
        search.notes.append(f"dataset '{ds.name}' has no train split: no few-shot demos were tried")

    opt_id = uuid.uuid4().hex[:12]
    config = {"prompt": prompt_ref, "seed_version": seed_prompt.version, "data": data_name,
              "dataset_version": ds.version, "model": model_spec, "objective": objective,
              "budget": plan.to_dict(), "max_prompt_tokens": max_prompt_tokens,
              "proposer": proposer if proposer is None or isinstance(proposer, str) else proposer.name,
              "limit_validation": limit_validation, "seed": seed, "demo_strategies": list(demo_strategies),
              "label_definitions": label_definitions,
              "validation_n": search.n_full, "screen_n": search.screen_n}
    with ws.store.session() as s:
        s.add(OptimizationRow(id=opt_id, prompt=seed_prompt.name, dataset=ds.name, status="running", config=config))

    def store_progress(trial: Trial) -> None:
        log(trial_line(trial, objective, plan))
        with ws.store.session() as s:
            row = s.get(OptimizationRow, opt_id)
            row.candidates = [t.to_dict() for t in search.trials]
            row.wall_s = time.perf_counter() - started
            row.tokens = search.tokens_spent
            row.cost = search.cost

    search.on_trial = store_progress
    log(f"optimizing {seed_prompt.name}@{seed_prompt.version} on {ds.name}:validation "
        f"({search.n_full} examples{f', screening on {search.screen_n}' if search.screen_n else ''}), "
        f"model {model_spec}, objective {objective}, budget "
        + (f"{plan.evaluations} candidates" if plan.evaluations else f"{plan.seconds:.0f} s"))
    try:
        # 1. the seed prompt, as it is
        seed_demos = seed_prompt.resolve_demos(ws)
        seed_spec = DemoSpec("seed", k=len(seed_demos)) if seed_demos else DemoSpec("none")
        variants = instruction_variants(seed_task(seed_prompt), search.labels, definitions=label_definitions,
                                        seed_placement="system" if has_system_part(seed_prompt) else "user",
                                        output_type=output_type)
        seed_trial = search.make_trial("seed", variants[0], seed_spec)
        search.run(seed_trial, search.n_full, baseline=True)
        if seed_trial.status != "ok":
            raise UserError(f"the seed prompt could not be scored: {seed_trial.note or seed_trial.status}")

        # 2. instruction variants, no demos
        specs = demo_specs(len(search.labels), demo_strategies) if search.pool else []
        proposer_share = min(PROPOSER_ROUNDS, max(1, (plan.left() or 0) // 5)) if proposer else 0
        share = None if plan.left() is None else max(1, plan.left() - proposer_share)
        if share is not None and specs:
            share = max(1, share // 2)  # half for instructions, half for demos
        trials = [t for v in variants if (t := search.make_trial("instruction", v, DemoSpec("none")))]
        search.stage(trials[:share] if share else trials)
        ranked = sorted(search.full(), key=lambda t: (-t.score, t.prompt_tokens or 0))
        top: list[InstructionVariant] = []
        for t in ranked:
            if t.variant not in top:
                top.append(t.variant)
        top = top[:TOP_INSTRUCTIONS] or [variants[0]]

        # 2b. JSON: the best candidate so far decoded under the schema's grammar (constrained
        # decoding is prompt engineering's structured-output tool, as servers offer it)
        if (seed_prompt.output.type == "json" and not seed_prompt.output.constrained
                and getattr(llm, "constrains_json", False) and (best := search.best()) is not None):
            trial = search.constrained_trial(best)
            if trial is not None:
                search.stage([trial], promote=1)
                if trial.status == "ok" and trial.score is not None and trial.score > (best.score or 0):
                    search.constrain = True

        # 3. the best instructions x demo strategies
        trials = [t for v in top for spec in specs if (t := search.make_trial("demos", v, spec))]
        if proposer_share and plan.left() is not None:
            trials = trials[: max(0, plan.left() - proposer_share)]
        search.stage(trials)

        # 4. reflective rewrites of the best instruction
        if proposer:
            _propose_rounds(search, proposer if not isinstance(proposer, str) else load_model(proposer, ws), seed)
    except BaseException as exc:
        with ws.store.session() as s:
            row = s.get(OptimizationRow, opt_id)
            row.status = "failed"
            row.result = {"error": f"{type(exc).__name__}: {exc}"}
            row.wall_s = time.perf_counter() - started
        raise

    # the winner: the shortest prompt within the best candidate's interval
    winner, best = choose_winner(search.full(), max_prompt_tokens)
    improved = winner is not None and winner is not seed_trial
    message = outcome(seed_trial, best, winner, improved, objective, max_prompt_tokens)
    winner = winner or seed_trial
    wall = time.perf_counter() - started

    committed = None
    if improved and commit:
        committed = _commit(ws, search, seed_prompt, winner, seed_trial, opt_id, plan, wall, author,
                            commit_prompt, model)
        message += f" Committed as {seed_prompt.name}@{committed}."
        if winner.demos.per_input:
            message += " " + describe_selector(winner.selector)
    elif improved:
        message += " Not committed (commit=False)."
    log(message)

    result = OptimizationResult(
        id=opt_id, prompt=seed_prompt.name, seed_version=seed_prompt.version, dataset=ds.name,
        dataset_version=ds.version, model=model_spec, objective=objective, improved=improved, version=committed,
        message=message, winner=winner.to_dict(), seed=seed_trial.to_dict(),
        candidates=[t.to_dict() for t in search.trials], budget=plan.to_dict(), wall_s=wall,
        tokens=search.tokens_spent, cost=search.cost, validation_n=search.n_full, notes=search.notes)
    with ws.store.session() as s:
        row = s.get(OptimizationRow, opt_id)
        row.status = "done"
        row.finished_at = utcnow()
        row.candidates = result.candidates
        row.wall_s, row.tokens, row.cost = wall, search.tokens_spent, search.cost
        row.result = {k: v for k, v in result.to_dict().items() if k not in ("candidates",)}

    # only now, with the search over: the test split, reported apart from validation
    if test:
        result.test = _test_scores(ws, search, seed_trial, winner, ds, limit_test, log, committed)
        with ws.store.session() as s:
            row = s.get(OptimizationRow, opt_id)
            row.result = {**(row.result or {}), "test": result.test}
    return result


def _propose_rounds(search: _Search, proposer_model: "Model", seed_value: int) -> None:
    for round_ in range(1, PROPOSER_ROUNDS + 1):
        if search.budget.exhausted():
            return
        base = search.best()
        if base is None:
            return
        failures, sampled = search.failures(base, seed_value + round_)
        if not failures:
            search.notes.append(f"proposer round {round_}: the best candidate made no mistake on "
                                f"{sampled} train examples; nothing to learn from")
            return
        shown = rendered_instruction(search.seed, base.variant.text)
        text, reply = propose(proposer_model, shown, search.labels or None, failures, seed=seed_value + round_)
        raw = reply.text
        search.tokens_spent += reply.prompt_tokens + reply.completion_tokens
        search.cost += request_cost(search.ws.pricing_for(proposer_model.name, proposer_model.backend), reply)
        if text is None:
            search.notes.append(f"proposer round {round_}: no usable instruction in the reply "
                                f"({raw.strip()[:80]!r})")
            continue
        variant = InstructionVariant(f"proposed #{round_}", text, base.variant.placement)
        spec = base.demos
        trial = search.make_trial("proposer", variant, spec)
        if trial is None:
            search.notes.append(f"proposer round {round_}: proposed the same instruction again")
            continue
        trial.note = f"from #{base.id}"
        search.run(trial, search.n_full)


def _commit(ws, search: _Search, seed_prompt, winner: Trial, seed_trial: Trial, opt_id: str, plan: Budget,
            wall: float, author, commit_prompt, model_override: str | None) -> str:
    prompt = winner.prompt
    if winner.demos.per_input:
        prompt = prompt.replace(demos=dict(winner.selector))
    if isinstance(model_override, str) and model_override != seed_prompt.model:
        prompt = prompt.replace(model=model_override)
    # the seed becomes the parent: commit the working file first when it is the seed and is new
    name = seed_prompt.name
    if (seed_prompt.version not in prompt_versions(ws, name) and prompt_path(ws, name).is_file()
            and current_version(ws, name) != seed_prompt.version):
        if read_prompt_file(prompt_path(ws, name), name, workspace=ws).version == seed_prompt.version:
            commit_prompt(ws, name, "optimization seed", author=author, meta={"optimization": opt_id})
    meta = {"optimization": {
        "id": opt_id, "parent_version": seed_prompt.version, "strategy": winner.stage,
        "candidate": winner.id, "name": winner.name, "instruction_variant": winner.variant.name,
        "placement": winner.variant.placement, "demos": winner.demos.to_dict()
        | ({"selector": winner.selector} if winner.demos.per_input else {}),
        "dataset": search.ds.name, "dataset_version": search.ds.version, "model": search.model_spec,
        "objective": search.objective,
        "validation": {"split": "validation", "n": winner.n, "value": winner.score, "lo": winner.lo,
                       "hi": winner.hi},
        "seed_validation": {"n": seed_trial.n, "value": seed_trial.score, "lo": seed_trial.lo,
                            "hi": seed_trial.hi},
        "prompt_tokens": winner.prompt_tokens, "seed_prompt_tokens": seed_trial.prompt_tokens,
        "budget": plan.to_dict(), "candidates": len(search.trials), "wall_s": round(wall, 3),
        "tokens": search.tokens_spent, "cost": search.cost,
    }}
    if parse_prompt(prompt.to_text(), name).version == current_version(ws, name):
        return current_version(ws, name)  # the winner is already the current version
    message = (f"optimize: {winner.name} — {search.objective} {seed_trial.score:.3f} -> {winner.score:.3f} "
               f"on {search.ds.name}:validation")
    if winner.demos.per_input:
        sel = winner.selector
        message += f"; demos per input: {sel['k']} nearest ({sel['strategy']}) from {sel['dataset']}:{sel['split']}"
    return commit_prompt(ws, name, message, author=author, meta=meta, text=prompt.to_text())


def _test_scores(ws, search: _Search, seed_trial: Trial, winner: Trial, ds, limit_test, log,
                 committed: str | None) -> dict[str, Any] | None:
    """The seed's and the winner's scores on the test split, after the search (same evaluator,
    default metrics and free-text answers, as a comparison would run them)."""
    if "test" not in ds.splits:
        search.notes.append(f"dataset '{ds.name}' has no test split: no test score")
        return None
    out: dict[str, Any] = {"split": "test"}
    data = f"{ds.name}@{ds.version}:test"
    for label, trial in (("seed", seed_trial), ("winner", winner)):
        if label == "winner" and trial is seed_trial:
            out["winner"] = out["seed"]
            break
        final = trial.candidate.with_free_text(True)  # as a comparison runs it: free answers too
        if label == "winner" and committed:
            final.name = f"{search.seed.name}@{committed}"
        result = evaluate(ws, final, data, limit=limit_test, progress=False)
        metric = result.metrics.get(search.objective) or {}
        out[label] = {"trial": trial.id, "run_id": result.id, "n": result.rows, "value": metric.get("value"),
                      "lo": metric.get("lo"), "hi": metric.get("hi"), "prompt_tokens": result.tokens.get("prompt"),
                      "metrics": {k: {"value": v.get("value"), "lo": v.get("lo"), "hi": v.get("hi")}
                                  for k, v in result.metrics.items()}}
        out["n"] = result.rows
        log(f"test ({label}, #{trial.id}): {search.objective} {fmt_interval(metric)} on {result.rows} examples, "
            f"{result.tokens.get('prompt') or 0:.0f} prompt tokens per request")
    return out


def _logger(progress: bool | Any) -> Callable[[str], None]:
    if progress is False or progress is None:
        return lambda line: None
    from rich.console import Console

    console = progress if isinstance(progress, Console) else Console(stderr=True, highlight=False)
    return lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)
