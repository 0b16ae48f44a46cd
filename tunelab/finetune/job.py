"""A fine-tuning job: check the input, register `ft:NAME`, train, keep the best, write artifacts.

Everything a user can get wrong (unknown dataset or prompt, no outputs, bad hyperparameters, a
missing base model, a batch larger than the data, unknown target modules) is checked before
anything is registered: such a run leaves no row and no files. Once training starts the row is
`running`; it becomes `done` with its result, or `failed` with the error. A run killed at any
point keeps its last checkpoint, and `resume=True` continues it.

Artifacts under `artifacts/finetunes/NAME/`: `adapter/` (LoRA, PEFT format) or `model/` (full),
`curves.json`, `curves.png`, `metadata.json`; while training also `checkpoints/last/` and `best/`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import select

from tunelab.datasets import Dataset, Example, get_dataset, holdout, subsample, validate_name
from tunelab.errors import NotFound, UserError
from tunelab.evaluate import Setup
from tunelab.files import write_json
from tunelab.finetune import checkpoint
from tunelab.finetune import train as tr
from tunelab.finetune.config import FineTuneConfig, resolve
from tunelab.finetune.data import balance_weights, render_examples, truncate
from tunelab.finetune.head import attach_head, head_items, head_labels, head_loss, make_head_validator, save_head
from tunelab.finetune.validate import evaluator_metric, make_validator
from tunelab.models.finetuned import finetune_dir, write_manifest
from tunelab.models.weights import BUNDLED_ALIASES, resolve_model_dir
from tunelab.prompts import load_prompt, save_version
from tunelab.store.models import FineTuneRow, utcnow

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

VALIDATION_SHARE = 0.1  # held out of train when the dataset has no validation split


class Pruned(Exception):
    """Raised by a fine-tune's `on_validation` hook to stop it (a hyperparameter search's pruner):
    the row is left `pruned`."""


@dataclass
class FineTuneResult:
    """What `finetune()` returns (and what the finetunes row's `result` holds, plus the config)."""

    name: str
    status: str
    base: str
    method: str
    dataset: str
    prompt: str
    config: dict[str, Any]
    n_train: int
    n_validation: int
    best: dict[str, Any] | None
    validation: dict[str, Any] | None  # the best validation's loss and metrics
    stopped_early: bool
    steps: int
    epochs_run: float
    wall_s: float
    train_s: float
    tokens_trained: int
    tokens_per_s: float
    cost: float
    path: str
    curves: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return f"ft:{self.name}"

    @property
    def candidate(self) -> str:
        """The candidate this fine-tune made: `ft:NAME` (its training prompt on the trained model)."""
        return f"ft:{self.name}"

    @property
    def setup(self) -> Setup:
        """What training took: wall time, compute cost, tokens trained, training examples."""
        return Setup(how="fine-tune", wall_s=self.wall_s, compute_cost=self.cost, tokens=self.tokens_trained,
                     examples=self.n_train, sources=[f"fine-tune {self.name} ({method_text(self.method, self.config)}, {self.wall_s:.0f} s, "
                                                     f"{self.tokens_trained:,} tokens)"])

    def to_dict(self, curves: bool = True) -> dict[str, Any]:
        data = asdict(self)
        data["model"] = self.model
        if not curves:
            data.pop("curves")
        return data


@dataclass
class Plan:
    """A checked job: everything resolved, nothing registered yet."""

    config: FineTuneConfig
    dataset: "Dataset"
    prompt: Any
    demos: list["Example"]
    base_dir: Path
    train_examples: list["Example"]
    val_examples: list["Example"]
    train_items: list
    val_items: list
    tokenizer: Any
    notes: list[str]
    labels: list[str] | None = None  # a head fine-tune's labels (its rows), from the train split


def method_text(method: str, config: dict[str, Any] | None) -> str:
    """"lora", "full", or "lora + classification head" (`--head classify`)."""
    return f"{method} + classification head" if (config or {}).get("head") == "classify" else method


def run_dir(ws: "Workspace", name: str) -> Path:
    """The fine-tune's folder: while training, its checkpoints; once done, the model `ft:NAME`."""
    return finetune_dir(ws, name)


def get_row(ws: "Workspace", name: str) -> FineTuneRow | None:
    with ws.store.session() as s:
        return s.scalar(select(FineTuneRow).where(FineTuneRow.name == name))


def list_finetunes(ws: "Workspace") -> list[FineTuneRow]:
    with ws.store.session() as s:
        return list(s.scalars(select(FineTuneRow).order_by(FineTuneRow.created_at, FineTuneRow.id)))


def _check_outputs(examples: list["Example"], split: str, ds_name: str) -> None:
    empty = [i for i, ex in enumerate(examples) if not isinstance(ex.output, str) or not ex.output.strip()]
    if empty:
        raise UserError(f"dataset '{ds_name}': {len(empty)} of {len(examples)} {split} examples have no output "
                        f"(e.g. example {empty[0] + 1}); fine-tuning needs an expected output for every example")


def plan(ws: "Workspace", config: FineTuneConfig) -> Plan:
    """Check everything and resolve the defaults from the data; registers nothing."""
    for key in ("data", "prompt", "name"):
        if not getattr(config, key):
            raise UserError(f"missing {key}: pass --{key} (or set '{key}:' in the config file)", field=key)
    validate_name(config.name, "fine-tune")
    notes: list[str] = []
    dataset = get_dataset(ws, config.data)
    if "train" not in dataset.splits:
        raise UserError(f"dataset '{dataset.name}' has no train split (splits: {', '.join(dataset.splits)}); "
                        f"make one with: tunelab data split {dataset.name}")
    train = list(dataset.splits["train"])
    _check_outputs(train, "train", dataset.name)

    if dataset.splits.get("validation"):
        val = list(dataset.splits["validation"])
        _check_outputs(val, "validation", dataset.name)
    else:
        if len(train) < 10:
            raise UserError(f"dataset '{dataset.name}' has no validation split and only {len(train)} training "
                            "examples; add a validation split (tunelab data split)")
        train, val = holdout(train, VALIDATION_SHARE, config.seed)
        notes.append(f"no validation split: holding out {len(val)} of the training examples (seed {config.seed}, "
                     "stratified)")
    train = subsample(train, config.max_examples, config.seed)
    val = subsample(val, config.max_val_examples, config.seed)
    if config.batch_size > len(train):
        raise UserError(f"batch size {config.batch_size} is larger than the {len(train)} training examples; "
                        f"use --batch-size {min(8, len(train))} or fewer", field="batch_size")
    prompt = load_prompt(ws, config.prompt)
    labels = None
    if config.head == "classify":
        labels = head_labels(prompt, train, notes)
        if config.method != "lora":
            raise UserError("--head classify trains LoRA and the head: use --method lora", field="method")
        if config.launcher != "local":
            raise UserError("--head classify trains in this process: use --launcher local", field="launcher")
    demos = prompt.resolve_demos(ws)
    base_dir = resolve_model_dir(config.base)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    def render(ex):
        return prompt.render(ex, demos)

    if labels is not None:
        train_items = head_items(train, render, tokenizer, labels)
        val_items = head_items(val, render, tokenizer, labels)
    else:
        train_items = render_examples(train, render, tokenizer)
        val_items = render_examples(val, render, tokenizer)
    longest = max(len(it) for it in train_items)
    counts = Counter(ex.output for ex in train)
    config = resolve(config, len(train_items), longest, n_labels=len(prompt.labels or []) or None,
                     label_counts=[counts[lab] for lab in prompt.labels] if prompt.labels else None)
    cut = sum(len(it) > config.max_length for it in train_items)
    if cut:
        notes.append(f"{cut} training examples are longer than {config.max_length} tokens: the middle of "
                     "their prompt is dropped")
    train_items = [truncate(it, config.max_length) for it in train_items]
    val_items = [truncate(it, config.max_length) for it in val_items]
    if config.balance:  # class balance: each training example's loss weight (validation stays plain)
        keys = [it.label for it in train_items] if labels is not None else [ex.output for ex in train]
        weights = balance_weights(keys, config.balance)
        for it, w in zip(train_items, weights):
            it.weight = w
        if weights and min(weights) != max(weights):
            notes.append(f"class balance {config.balance:g}: loss weights {min(weights):.2f} (the most frequent output) "
                         f"to {max(weights):.2f} (the rarest)")
    return Plan(config, dataset, prompt, demos, base_dir, train, val, train_items, val_items, tokenizer, notes, labels)


def describe(p: Plan) -> list[str]:
    """The resolved configuration, for printing before training starts."""
    c = p.config
    per_epoch, total = tr.plan_steps(len(p.train_items), c)
    lengths = sorted(len(it) for it in p.train_items)
    lines = [
        f"fine-tune ft:{c.name}: {method_text(c.method, {'head': c.head})} on {c.base} ({p.base_dir})",
        f"  data     {p.dataset.name}@{p.dataset.version}: {len(p.train_items):,} train, "
        f"{len(p.val_items):,} validation; prompt {p.prompt.name}@{p.prompt.version}"
        + (f" with {len(p.demos)} demos" if p.demos else ""),
        f"  tokens   per example median {lengths[len(lengths) // 2]}, max {lengths[-1]} "
        f"(max_length {c.max_length}); " + (f"loss: cross-entropy of a linear head over {len(p.labels)} labels "
                                            "(the train split's) on the prompt's last token" if p.labels
                                            else "loss on the completion only"),
        f"  schedule {c.epochs} epochs x {per_epoch} steps = {total} steps"
        + (f" (capped by max_steps {c.max_steps})" if c.max_steps and c.max_steps < per_epoch * c.epochs else "")
        + f"; batch {c.batch_size} x grad_accum {c.grad_accum}; lr {c.lr:g}, warmup {c.warmup_ratio:g}, "
          f"weight decay {c.weight_decay:g}",
    ]
    if c.method == "lora":
        lines.append(f"  lora     r {c.lora_r}, alpha {c.lora_alpha:g}, dropout {c.lora_dropout:g}, "
                     f"modules {','.join(c.target_modules)}")
    lines.append(f"  run      precision {'bf16 autocast' if tr.use_bf16(c.precision) else 'fp32'}, "
                 f"{c.micro_batch_tokens} tokens per forward pass, gradient checkpointing "
                 f"{'on' if c.gradient_checkpointing else 'off'}, seed {c.seed}, patience {c.patience or 'off'}, "
                 f"checkpoint every {str(c.save_every_steps) + ' steps and ' if c.save_every_steps else ''}epoch")
    lines.extend(f"  note     {n}" for n in p.notes)
    return lines


def finetune(ws: "Workspace", config: FineTuneConfig, *, resume: bool = False, progress: bool = True,
             log: Callable[[str], None] | None = None,
             on_validation: Callable[[int, dict[str, Any], bool], None] | None = None) -> FineTuneResult:
    """Train `ft:NAME` as `config` says. With `resume`, continue an interrupted run of that name
    (its stored configuration wins). Returns the result; the row and artifacts are stored.
    `on_validation(k, result, last)` is called after the k-th validation (k from 0; `last`: the run's
    final one) and may raise `Pruned`."""
    log = log or (lambda s: None)
    if not config.name:
        raise UserError("missing name: pass --name NAME", field="name")
    row = get_row(ws, config.name)
    if row is not None:
        if row.status == "done":
            raise UserError(f"fine-tune 'ft:{config.name}' already exists (finished {row.finished_at:%Y-%m-%d %H:%M}); "
                            "choose another --name", field="name")
        if not resume:
            raise UserError(f"fine-tune 'ft:{config.name}' was interrupted (status {row.status}); pass --resume "
                            "to continue it, or choose another --name", field="name")
        stored = FineTuneConfig.model_validate({k: v for k, v in (row.config or {}).items()
                                                if k in FineTuneConfig.model_fields})
        stored = stored.model_copy(update={"data": f"{row.dataset}@{row.dataset_version}",
                                           "prompt": f"{row.prompt}@{row.prompt_version}"})
        changed = [k for k in config.model_fields_set
                   if k not in ("data", "prompt", "name") and getattr(config, k) != getattr(stored, k)]
        if changed:
            log(f"resuming with the stored configuration; ignoring changed {', '.join(sorted(changed))}")
        config = stored
    elif resume:
        log(f"nothing to resume for ft:{config.name}: starting a new fine-tune")
        resume = False
    p = plan(ws, config)
    model, _ = tr.load_for_training(p.base_dir, p.config)  # may still fail on bad input: before registering
    if p.labels is not None:
        attach_head(model, len(p.labels), p.config.seed)
    for line in describe(p):
        log(line)
    return _run(ws, p, model, row, progress=progress, log=log, on_validation=on_validation)


def _register(ws: "Workspace", p: Plan) -> None:
    """The finetunes row (status running) and the prompt version the fine-tune is pinned to."""
    c = p.config
    save_version(ws, p.prompt)  # a working-file version too: ft:NAME can always be evaluated with it
    with ws.store.session() as s:
        s.add(FineTuneRow(name=c.name, status="running", base=_base_spec(c.base), method=c.method,
                          dataset=p.dataset.name, dataset_version=p.dataset.version, prompt=p.prompt.name,
                          prompt_version=p.prompt.version, config=c.model_dump(mode="json"),
                          result={"n_train": len(p.train_items), "n_validation": len(p.val_items)},
                          path=str(Path("finetunes") / c.name)))


def _base_spec(base: str) -> str:
    return base if base.lower() in BUNDLED_ALIASES else str(Path(base).expanduser().resolve())


def _update(ws: "Workspace", name: str, **values: Any) -> None:
    with ws.store.session() as s:
        row = s.scalar(select(FineTuneRow).where(FineTuneRow.name == name))
        for k, v in values.items():
            setattr(row, k, v)


def _run(ws: "Workspace", p: Plan, model, row: FineTuneRow | None, *, progress: bool, log,
         on_validation=None) -> FineTuneResult:
    c = p.config
    folder = run_dir(ws, c.name)
    if row is None:
        if folder.exists():  # leftovers of a run that never registered
            shutil.rmtree(folder)
        _register(ws, p)
    folder.mkdir(parents=True, exist_ok=True)
    lock = _lock(folder, c.name)
    if row is not None:
        _update(ws, c.name, status="running")
    bf16 = tr.use_bf16(c.precision)
    precision = "bf16" if bf16 else "fp32"
    metric = evaluator_metric(p.prompt, p.demos, p.val_examples, p.base_dir, precision, c.name, labels=p.labels,
                              max_length=c.max_length)
    validate = (make_head_validator if p.labels is not None else make_validator)(p.val_items, p.tokenizer, bf16, metric)
    pricing = ws.pricing_for("local", "local")

    def on_checkpoint(state: dict[str, Any]) -> None:  # the row shows progress while training
        _update(ws, c.name, wall_s=state["wall_s"], tokens_trained=state["tokens"],
                cost=pricing.per_hour * state["wall_s"] / 3600)

    try:
        trained = tr.train(model, p.tokenizer, p.train_items, validate, c, folder, resume=row is not None,
                           progress=progress, log=log, on_checkpoint=on_checkpoint,
                           loss_fn=head_loss if p.labels is not None else None, on_validation=on_validation)
        result = _finish(ws, p, model, trained, pricing.per_hour)
    except BaseException as exc:
        message = ("interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc) if isinstance(exc, Pruned)
                   else f"{type(exc).__name__}: {exc}")
        try:
            with ws.store.session() as s:
                r = s.scalar(select(FineTuneRow).where(FineTuneRow.name == c.name))
                r.status = "pruned" if isinstance(exc, Pruned) else "failed"
                r.result = {**(r.result or {}), "error": message}
        finally:
            raise
    finally:
        lock.close()
    log(f"ft:{c.name} done in {result.wall_s:.0f} s: {result.tokens_trained:,} tokens at "
        f"{result.tokens_per_s:.0f} tokens/s" + (f"; best validation {_best_text(result.best)}" if result.best else ""))
    return result


def _lock(folder: Path, name: str):
    """Hold `folder/.lock` while training: a second process on the same fine-tune is refused. The
    lock goes with its process, even a killed one."""
    import fcntl

    handle = open(folder / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserError(f"fine-tune 'ft:{name}' is being trained by another process right now") from None
    return handle


def _best_text(best: dict[str, Any]) -> str:
    text = f"at step {best['step']} (epoch {best['epoch']:g}): loss {best['loss']:.4f}"
    if best.get("metric") is not None:
        text += f", {best.get('metric_name')} {best['metric']:.4f}"
    return text


def _finish(ws: "Workspace", p: Plan, model, trained, per_hour: float) -> FineTuneResult:
    c = p.config
    folder = run_dir(ws, c.name)
    state = trained.state
    if trained.best_weights is not None:
        checkpoint.load_weights(folder / "best", model)
    target = folder / ("adapter" if c.method == "lora" else "model")
    tmp = folder / f".tmp-{target.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    if c.method == "lora":
        model.save_pretrained(tmp)
        if p.labels is not None:
            save_head(model, tmp, p.labels, c.max_length)
    else:
        tr.causal_lm(model).save_pretrained(tmp)
        p.tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    best_eval = None
    if state.get("best"):
        best_eval = next((e for e in state["eval_curve"] if e["step"] == state["best"]["step"]), None)
    curves = {"train_curve": state["train_curve"], "eval_curve": state["eval_curve"]}
    wall = float(state["wall_s"])
    result = FineTuneResult(
        name=c.name, status="done", base=_base_spec(c.base), method=c.method,
        dataset=f"{p.dataset.name}@{p.dataset.version}", prompt=f"{p.prompt.name}@{p.prompt.version}",
        config=c.model_dump(mode="json"), n_train=len(p.train_items), n_validation=len(p.val_items),
        best=state.get("best"), validation=best_eval, stopped_early=bool(state.get("stopped_early")),
        steps=int(state["step"]), epochs_run=round(state["step"] / max(1, _per_epoch(p)), 3), wall_s=round(wall, 2),
        train_s=round(float(state["train_s"]), 2), tokens_trained=int(state["tokens"]),
        tokens_per_s=round(state["tokens"] / max(1e-9, state["train_s"]), 1),
        cost=per_hour * round(wall, 2) / 3600, path=str(Path("finetunes") / c.name), curves=curves)
    write_json(folder / "curves.json", curves)
    try:
        plot_curves(curves, folder / "curves.png", title=f"ft:{c.name}")
    except Exception as exc:  # a plot must never lose a finished training
        (folder / "curves.png.error").write_text(f"{type(exc).__name__}: {exc}\n", encoding="utf-8")
    meta = result.to_dict(curves=False)
    meta.update(prompt_text=p.prompt.to_text(), base_dir=str(p.base_dir), segments=state.get("segments", 1),
                artifact=target.name, created_by="tunelab finetune",
                **({"head": {"kind": "classify", "labels": len(p.labels)}} if p.labels is not None else {}))
    write_manifest(folder, meta)  # last: from now on the folder is the model ft:NAME
    with ws.store.session() as s:
        row = s.scalar(select(FineTuneRow).where(FineTuneRow.name == c.name))
        row.status = "done"
        row.result = result.to_dict()
        row.finished_at = utcnow()
        row.wall_s = result.wall_s
        row.tokens_trained = result.tokens_trained
        row.cost = result.cost
    for leftover in ("checkpoints", "best", ".old-best", ".tmp-best"):
        shutil.rmtree(folder / leftover, ignore_errors=True)
    return result


def _per_epoch(p: Plan) -> int:
    return tr.plan_steps(len(p.train_items), p.config)[0]


def plot_curves(curves: dict[str, Any], path: Path, title: str = "") -> None:
    """Loss (train per step, validation per evaluation) and the validation metric, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = curves.get("train_curve") or [], curves.get("eval_curve") or []
    metric_name = next((e.get("metric_name") for e in evals if e.get("metric_name")), None)
    fig, axes = plt.subplots(1, 2 if metric_name else 1, figsize=(10 if metric_name else 5.5, 3.6), squeeze=False)
    ax = axes[0][0]
    if train:
        steps = [t["step"] for t in train]
        losses = [t["loss"] for t in train]
        ax.plot(steps, losses, color="#9bb7d4", linewidth=0.8, label="train (per step)")
        window = max(1, len(losses) // 20)
        if window > 1:
            smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, color="#1f5f99", linewidth=1.5, label=f"train (mean of {window})")
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", color="#d4572a", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (completion tokens)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if metric_name:
        ax2 = axes[0][1]
        pts = [(e["step"], e["metric"]) for e in evals if e.get("metric") is not None]
        ax2.plot([s for s, _ in pts], [m for _, m in pts], "o-", color="#2a8d4f")
        ax2.set_xlabel("step")
        ax2.set_ylabel(f"validation {metric_name}")
        ax2.grid(alpha=0.3)
    save_figure(fig, path, title)


def save_figure(fig, path: Path, title: str = "") -> None:
    """Write a matplotlib figure as a PNG, atomically (a reader never sees half a file), and close it."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def finetune_info(ws: "Workspace", name: str) -> dict[str, Any]:
    """The stored row of `ft:NAME` as a dict (config, result, status, ...)."""
    row = get_row(ws, name)
    if row is None:
        raise NotFound(f"unknown fine-tune '{name}'")
    return {"name": row.name, "status": row.status, "base": row.base, "method": row.method,
            "dataset": f"{row.dataset}@{row.dataset_version}", "prompt": f"{row.prompt}@{row.prompt_version}",
            "config": row.config, "result": row.result, "path": str(ws.artifacts_dir / row.path),
            "created_at": row.created_at, "finished_at": row.finished_at, "wall_s": row.wall_s,
            "tokens_trained": row.tokens_trained, "cost": row.cost}


def setup_of(ws: "Workspace", name: str) -> Setup:
    """What training `ft:NAME` took (from its row): wall time, compute cost, tokens, examples."""
    row = get_row(ws, name)
    if row is None:
        raise NotFound(f"unknown fine-tune '{name}'")
    return Setup(how="fine-tune", wall_s=float(row.wall_s or 0.0), compute_cost=float(row.cost or 0.0),
                 tokens=int(row.tokens_trained or 0), examples=examples_trained(ws, row),
                 sources=[f"fine-tune {name} ({method_text(row.method, row.config)}, {float(row.wall_s or 0):.0f} s, "
                          f"{row.tokens_trained or 0:,} tokens)"])


def examples_trained(ws: "Workspace", row: FineTuneRow) -> int | None:
    """How many training examples the fine-tune saw (its result, else its data and config)."""
    n = (row.result or {}).get("n_train")
    if isinstance(n, int):
        return n
    try:
        n = len(get_dataset(ws, f"{row.dataset}@{row.dataset_version}").split("train"))
    except UserError:
        return None
    limit = (row.config or {}).get("max_examples")
    return min(n, int(limit)) if limit else n


def training_curves(ws: "Workspace", name: str) -> dict[str, Any] | None:
    """Loss and metric curves of `ft:NAME` ({train_loss: [[step, v]], val_loss: [[epoch, v]],
    val_metric: [[epoch, v]]}): from its result, else its curves.json; None without any."""
    row = get_row(ws, name)
    if row is None:
        return None
    result = row.result or {}
    curves = result.get("curves") if isinstance(result.get("curves"), dict) else None
    if curves is None and row.path:
        path = ws.artifacts_dir / row.path / "curves.json"
        if path.is_file():
            try:
                curves = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                curves = None
    source = curves or result
    train, evals = source.get("train_curve") or [], source.get("eval_curve") or []
    if not (isinstance(train, list) and isinstance(evals, list)) or not (train or evals):
        return None

    def points(items: list, key: str) -> list[list[float]]:
        return [[it.get("epoch", it.get("step")), it[key]] for it in items
                if isinstance(it, dict) and it.get(key) is not None and it.get("epoch", it.get("step")) is not None]

    return {"train_loss": points(train, "loss"), "val_loss": points(evals, "loss"),
            "val_metric": points(evals, "metric"), "x_label": "epoch"}
