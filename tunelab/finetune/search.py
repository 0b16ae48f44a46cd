"""A hyperparameter search on the validation split: which learning rate, epochs, LoRA rank and
alpha, target modules and base model make the best fine-tune.

    result = search(ws, FineTuneConfig(data="spam", prompt="spam-short", name="spam"), trials=8)
    result.candidate          # "ft:spam": the best trial's model
    result.trials             # every trial: its settings, state, validation curve, fine-tune

Optuna does the searching: a TPE sampler proposes the settings, and each trial is a fine-tune
(`job.finetune`, named `NAME-tK`) whose validation after every epoch — the evaluator's own metric on
the validation split — is reported to a median pruner, which stops a trial that is worse than the
median of the earlier ones at the same epoch (never after its last epoch: a trial that finished is
kept, whatever its score). The budget is a number of trials, minutes, or both
(whichever ends first; a running trial is finished). The study is a journal file in
`artifacts/searches/NAME/`, so a killed search started again with the same name continues: the
finished trials are kept, and the trial that was running resumes its fine-tune from its last
checkpoint. At the end the best trial's model becomes `ft:NAME`; its row holds the search (every
trial's settings and curve) and its setup is the whole search's wall time and cost, since that is
what the best fine-tune took to find. The trials are plotted in `search.png` and in the report.

The search space is a YAML file (`--search-space FILE`) or the default below; a range is
`[low, high]` (learning rate on a log scale), a list is a set of choices.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import select

from tunelab.errors import UserError, pydantic_message
from tunelab.files import load_yaml, read_text, write_json
from tunelab.finetune.config import FineTuneConfig
from tunelab.finetune.job import FineTuneResult, Pruned, finetune, get_row, run_dir, save_figure
from tunelab.models.finetuned import write_manifest
from tunelab.models.weights import bundled
from tunelab.store.models import FineTuneRow, utcnow

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

ATTENTION = "q_proj,k_proj,v_proj,o_proj"
ALL_LINEAR = ATTENTION + ",gate_proj,up_proj,down_proj"


class SearchSpace(BaseModel):
    """What a search may choose. Ranges are [low, high]; lists are choices. `base` defaults to the
    fine-tune's own base (name several to let the search choose the model too)."""

    model_config = ConfigDict(extra="forbid")

    lr: tuple[float, float] = Field((2e-4, 3e-3), description="learning rate range, searched on a log scale")
    epochs: tuple[int, int] = Field((1, 3), description="range of epochs")
    lora_r: list[int] = Field([4, 8, 16, 32], description="LoRA ranks to choose from")
    lora_alpha_ratio: list[float] = Field([1.0, 2.0], description="LoRA alpha as a multiple of the rank")
    target_modules: list[str] = Field(["q_proj,v_proj", ATTENTION, ALL_LINEAR],
                                      description="module sets (comma-separated names) to choose from")
    base: list[str] | None = Field(None, description="base models to choose from (default: the fine-tune's base)")
    balance: list[float] = Field([0.0], description="class balance of the loss to choose from (0 plain, 1 every "
                                                    "output counts the same; `tunelab flow` searches 0, 0.5 and 1 "
                                                    "for skewed labels judged by macro-F1)")

    @field_validator("lr", "epochs")
    @classmethod
    def _range(cls, value: tuple, info) -> tuple:
        low, high = value
        if low > high:
            raise ValueError(f"the range [{low:g}, {high:g}] is empty (low must be at most high)")
        if info.field_name == "lr" and low <= 0:
            raise ValueError(f"learning rates must be positive (got {low:g})")
        if info.field_name == "epochs" and low < 1:
            raise ValueError(f"epochs start at 1 (got {low})")
        return value

    @field_validator("lora_r", "lora_alpha_ratio", "target_modules", "base", "balance")
    @classmethod
    def _choices(cls, value: list | None, info) -> list | None:
        if value is not None and not value:
            raise ValueError("is empty: list at least one choice")
        if info.field_name == "lora_r" and any(r < 1 for r in value):
            raise ValueError(f"LoRA ranks are at least 1 (got {min(value)})")
        if info.field_name == "lora_alpha_ratio" and any(a <= 0 for a in value):
            raise ValueError(f"alpha ratios must be positive (got {min(value):g})")
        if info.field_name == "balance" and any(not 0 <= b <= 1 for b in value):
            raise ValueError(f"class balance is between 0 and 1 (got {[b for b in value if not 0 <= b <= 1][0]:g})")
        return value


def load_space(path: str | Path | None) -> SearchSpace:
    """The search space of a YAML file (None: the default space); errors name the file and field."""
    if path is None:
        return SearchSpace()
    path = Path(path)
    data = load_yaml(read_text(path, missing="search space file not found"), path)
    if not isinstance(data, dict):
        raise UserError("expected a mapping of search ranges and choices (lr: [1e-4, 3e-3], lora_r: [8, 16], ...)",
                        path=path)
    try:
        return SearchSpace.model_validate(data)
    except ValidationError as exc:
        raise UserError(pydantic_message(exc, SearchSpace), path=path) from None


class SearchResult(BaseModel):
    """What `search()` returns; `summary()` is what the row of `ft:NAME` keeps as `search`."""

    name: str
    best_trial: int
    best: FineTuneResult
    trials: list[dict[str, Any]]
    space: dict[str, Any]
    wall_s: float
    cost: float
    budget: dict[str, Any]

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @property
    def candidate(self) -> str:
        return f"ft:{self.name}"

    def summary(self) -> dict[str, Any]:
        return {"best_trial": self.best_trial, "best_finetune": self.best.name, "trials": self.trials,
                "space": self.space, "wall_s": self.wall_s, "cost": self.cost, "budget": self.budget}


def search_dir(ws: "Workspace", name: str) -> Path:
    return ws.artifacts_dir / "searches" / name


def check_budget(trials: int | None, minutes: float | None) -> None:
    if trials is None and minutes is None:
        raise UserError("a search needs a budget: --search N (trials) and/or --search-minutes M", field="search")
    if trials is not None and trials < 1:
        raise UserError(f"--search takes a number of trials of at least 1 (got {trials})", field="search")
    if minutes is not None and not minutes > 0:
        raise UserError(f"--search-minutes takes a positive number of minutes (got {minutes:g})",
                        field="search_minutes")


def search(ws: "Workspace", config: FineTuneConfig, *, trials: int | None = None, minutes: float | None = None,
           space: SearchSpace | None = None, progress: bool = True,
           log: Callable[[str], None] | None = None) -> SearchResult:
    """Search `space` for the best fine-tune of `config` (see the module doc); the best becomes
    `ft:NAME`. Started again with the same name, a killed search continues."""
    import optuna

    log = log or (lambda s: None)
    check_budget(trials, minutes)
    space = space or SearchSpace()
    if not config.name:
        raise UserError("missing name: pass --name NAME", field="name")
    if config.method != "lora":
        raise UserError("a search tunes LoRA fine-tunes (rank, alpha, modules): use --method lora", field="method")
    bases = space.base or [config.base]
    for base in bases:
        if bundled(base) is None and not Path(base).expanduser().is_dir():
            raise UserError(f"unknown base model '{base}' in the search space (bundled: smollm2-135m, gemma3-270m; "
                            "or a local Hugging Face folder)", field="base")
    row = get_row(ws, config.name)
    if row is not None and row.status == "done":
        raise UserError(f"fine-tune 'ft:{config.name}' already exists; choose another --name", field="name")

    folder = search_dir(ws, config.name)
    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(folder / "journal.log")))
    study = optuna.create_study(
        study_name=config.name, storage=storage, direction="maximize", load_if_exists=True,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    # seeded by what the study already holds: a resumed search must not draw the settings its
    # killed process drew first (the same seed again would repeat them, trial for trial)
    study.sampler = optuna.samplers.TPESampler(seed=config.seed + len(study.trials),
                                               n_startup_trials=min(4, trials or 4))
    _retry_interrupted(study, storage, log)
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    remaining = None if trials is None else max(0, trials - len(done))
    if done:
        log(f"search {config.name}: continuing after {len(done)} finished trials")
    started = time.perf_counter()
    deadline = None if minutes is None else started + minutes * 60

    def objective(trial) -> float:
        settings = _suggest(trial, space, bases)
        name = trial.user_attrs.get("finetune") or f"{config.name}-t{trial.number}"
        trial.set_user_attr("finetune", name)
        existing = get_row(ws, name)
        if existing is not None and existing.status == "done":  # finished before a crash hid it from the study
            return _value(existing.result or {})
        trial_config = config.model_copy(update={**settings, "name": name})
        log(f"\ntrial {trial.number} (ft:{name}): " + ", ".join(f"{k}={_show(v)}" for k, v in settings.items()))

        def report(k: int, result: dict[str, Any], last: bool) -> None:
            trial.report(_value(result), step=k)
            # a finished trial is kept whatever its score: pruning it would only discard work already done
            if not last and trial.should_prune():
                raise Pruned(f"pruned by the search after validation {k + 1}: "
                             f"{result.get('metric_name') or 'loss'} {_value(result):.4f} is below the median")

        try:
            result = finetune(ws, trial_config, resume=existing is not None, progress=progress, log=log,
                              on_validation=report)
        except Pruned as exc:
            log(f"trial {trial.number}: {exc}")
            raise optuna.TrialPruned(str(exc)) from None
        value = _value(result.to_dict(curves=False))
        log(f"trial {trial.number}: validation {result.best.get('metric_name') or 'score'} {value:.4f}")
        return value

    def out_of_time(study, trial) -> None:
        if deadline is not None and time.perf_counter() >= deadline:
            study.stop()

    if remaining != 0 and (deadline is None or time.perf_counter() < deadline):
        study.optimize(objective, n_trials=remaining, timeout=None if minutes is None else minutes * 60,
                       callbacks=[out_of_time], catch=())
    return _finish(ws, config, study, space, {"trials": trials, "minutes": minutes}, log)


def _suggest(trial, space: SearchSpace, bases: list[str]) -> dict[str, Any]:
    low, high = space.lr
    lr = trial.suggest_float("lr", low, high, log=True) if low < high else low
    epochs = trial.suggest_int("epochs", *space.epochs)
    r = trial.suggest_categorical("lora_r", space.lora_r)
    ratio = trial.suggest_categorical("lora_alpha_ratio", space.lora_alpha_ratio)
    modules = trial.suggest_categorical("target_modules", space.target_modules)
    base = trial.suggest_categorical("base", bases)
    settings = {"lr": lr, "epochs": epochs, "lora_r": r, "lora_alpha": float(r * ratio),
                "target_modules": [m.strip() for m in modules.split(",") if m.strip()], "base": base}
    # searched only when there is a choice: a space without one keeps its trials' parameters as they were
    balance = trial.suggest_categorical("balance", space.balance) if len(space.balance) > 1 else space.balance[0]
    if balance:
        settings["balance"] = float(balance)
    return settings


def _value(result: dict[str, Any]) -> float:
    """What the search maximizes: the validation task metric, else minus the validation loss."""
    best = result.get("best") if "best" in result else None
    source = best if isinstance(best, dict) else result
    metric = source.get("metric")
    if metric is not None and metric == metric:
        return float(metric)
    loss = source.get("loss")
    return -float(loss) if loss is not None else -math.inf


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def _retry_interrupted(study, storage, log) -> None:
    """A trial a killed or interrupted search left unfinished (running, or failed by Ctrl-C) is
    queued again with the same settings and fine-tune name, so its fine-tune resumes from its last
    checkpoint."""
    from optuna.trial import TrialState

    kept = {t.user_attrs.get("finetune") for t in study.trials
            if t.state in (TrialState.WAITING, TrialState.COMPLETE, TrialState.PRUNED)}
    for t in study.trials:
        name = t.user_attrs.get("finetune")
        if t.state == TrialState.RUNNING:  # its process is gone (SIGKILL, power loss)
            storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        if t.state in (TrialState.RUNNING, TrialState.FAIL) and name and name not in kept:
            study.enqueue_trial(t.params, user_attrs={"finetune": name})
            kept.add(name)
            log(f"trial {t.number} did not finish: queued again (ft:{name} resumes from its checkpoint)")


def trial_rows(ws: "Workspace", study) -> list[dict[str, Any]]:
    """Every trial of the study: settings, state, value, its validation curve and fine-tune."""
    from optuna.trial import TrialState

    rows = []
    retried = {t.user_attrs.get("finetune") for t in study.trials if t.state != TrialState.FAIL}
    for t in study.trials:
        name = t.user_attrs.get("finetune")
        if t.state == TrialState.FAIL and name in retried:
            continue  # interrupted, then run again as a later trial
        row = get_row(ws, name) if name else None
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": dict(t.params),
                     "curve": [[int(k), float(v)] for k, v in sorted(t.intermediate_values.items())],
                     "finetune": name, "wall_s": float(row.wall_s or 0.0) if row else 0.0,
                     "cost": float(row.cost or 0.0) if row else 0.0,
                     "tokens": int(row.tokens_trained or 0) if row else 0})
    return rows


def _finish(ws: "Workspace", config: FineTuneConfig, study, space: SearchSpace, budget: dict[str, Any],
            log) -> SearchResult:
    """Make the best trial's fine-tune `ft:NAME`: its folder copied, its row copied with the search."""
    from optuna.trial import TrialState

    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise UserError(f"search {config.name}: no trial finished (see the log above); nothing to keep")
    best = max(complete, key=lambda t: (t.value, -t.number))
    trials = trial_rows(ws, study)
    wall = round(sum(t["wall_s"] for t in trials), 2)
    cost = sum(t["cost"] for t in trials)
    source = get_row(ws, best.user_attrs["finetune"])
    result = dict(source.result or {})
    folder = run_dir(ws, config.name)
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(run_dir(ws, source.name), folder, ignore=shutil.ignore_patterns(".lock"))
    summary = {"best_trial": best.number, "best_finetune": source.name, "trials": trials,
               "space": space.model_dump(mode="json"), "wall_s": wall, "cost": cost, "budget": budget}
    result.update(name=config.name, wall_s=wall, cost=cost, path=str(Path("finetunes") / config.name),
                  tokens_trained=sum(t["tokens"] for t in trials), search=summary)
    write_json(search_dir(ws, config.name) / "trials.json", summary)
    try:
        plot_trials(summary, search_dir(ws, config.name) / "search.png", title=f"search for ft:{config.name}")
        shutil.copy2(search_dir(ws, config.name) / "search.png", folder / "search.png")
    except Exception as exc:  # a plot must never lose a finished search
        log(f"could not plot the trials: {type(exc).__name__}: {exc}")
    import json

    manifest = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    manifest.update(name=config.name, wall_s=wall, cost=cost, search={"best_trial": best.number,
                                                                      "best_finetune": source.name,
                                                                      "trials": len(trials)})
    write_manifest(folder, manifest)
    with ws.store.session() as s:
        row = s.scalar(select(FineTuneRow).where(FineTuneRow.name == config.name))
        if row is None:
            row = FineTuneRow(name=config.name)
            s.add(row)
        for key in ("base", "method", "dataset", "dataset_version", "prompt", "prompt_version", "config"):
            setattr(row, key, getattr(source, key))
        row.status, row.result, row.path, row.finished_at = "done", result, result["path"], utcnow()
        row.wall_s, row.cost, row.tokens_trained = wall, cost, sum(t["tokens"] for t in trials)
    fields = set(FineTuneResult.__dataclass_fields__)
    best_result = FineTuneResult(**{k: v for k, v in result.items() if k in fields})
    log(f"\nsearch {config.name}: {len(trials)} trials ({sum(t['state'] == 'pruned' for t in trials)} pruned) in "
        f"{wall:.0f} s; best: trial {best.number} ({_show_params(best.params)}), validation {best.value:.4f} "
        f"-> ft:{config.name}")
    return SearchResult(name=config.name, best_trial=best.number, best=best_result, trials=trials,
                        space=space.model_dump(mode="json"), wall_s=wall, cost=cost, budget=budget)


def _show_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_show(v)}" for k, v in params.items())


def search_of(ws: "Workspace", name: str) -> dict[str, Any] | None:
    """The search that made `ft:NAME` (its trials, space, budget), or None for a plain fine-tune."""
    row = get_row(ws, name)
    found = (row.result or {}).get("search") if row is not None else None
    return found if isinstance(found, dict) else None


def plot_trials(summary: dict[str, Any], path: Path, title: str = "") -> None:
    """The trials as a PNG (`draw_trials`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    draw_trials(left, right, summary.get("trials") or [], summary.get("best_trial"))
    save_figure(fig, path, title)


def draw_trials(left, right, trials: list[dict[str, Any]], best_trial: int | None) -> None:
    """On two matplotlib axes: each trial's validation score by epoch (pruned ones dashed), and each
    trial's last score in trial order, the best one marked (also drawn in the comparison report)."""
    for t in trials:
        if not t.get("curve"):
            continue
        pruned = t["state"] == "pruned"
        left.plot([k + 1 for k, _ in t["curve"]], [v for _, v in t["curve"]], "--" if pruned else "-", marker="o",
                  markersize=3, linewidth=1, label=f"trial {t['number']}" + (" (pruned)" if pruned else ""))
    left.set_xlabel("validation (epoch)")
    left.set_ylabel("validation score")
    left.grid(alpha=0.3)
    if 0 < len(trials) <= 12:
        left.legend(fontsize=7)
    colors = {"complete": "#1f5f99", "pruned": "#bbbbbb", "fail": "#d4572a"}
    for t in trials:
        value = t["value"] if t["value"] is not None else (t["curve"][-1][1] if t.get("curve") else None)
        if value is None:
            continue
        best = t["number"] == best_trial
        right.scatter([t["number"]], [value], color="#2a8d4f" if best else colors.get(t["state"], "#888888"),
                      s=60 if best else 25, zorder=3, label="best" if best else None)
    right.set_xlabel("trial")
    right.set_ylabel("validation score (last)")
    right.grid(alpha=0.3)
