"""`tunelab finetune` and `tunelab export`. Thin: `tunelab.finetune` does the work.

The flags are the fields of `tunelab.finetune.FineTuneConfig` (their help text is the field's
description); `--config FILE` reads the same fields from YAML and flags override it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunelab.cli._common import console, err_console, print_json, workspace
from tunelab.errors import UserError
from tunelab.finetune.config import field_help as h


def finetune(
    data: Optional[str] = typer.Option(None, "--data", "-d", help=h("data")),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help=h("prompt")),
    name: Optional[str] = typer.Option(None, "--name", "-n", help=h("name")),
    base: Optional[str] = typer.Option(None, "--base", help=h("base")),
    method: Optional[str] = typer.Option(None, "--method", help=h("method")),
    head: Optional[str] = typer.Option(None, "--head", help=h("head")),
    lr: Optional[float] = typer.Option(None, "--lr", help=h("lr")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=h("batch_size")),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help=h("grad_accum")),
    epochs: Optional[int] = typer.Option(None, "--epochs", help=h("epochs")),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help=h("max_steps")),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", help=h("lora_r")),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help=h("lora_alpha")),
    lora_dropout: Optional[float] = typer.Option(None, "--lora-dropout", help=h("lora_dropout")),
    target_modules: Optional[str] = typer.Option(None, "--target-modules", help=h("target_modules")),
    max_length: Optional[int] = typer.Option(None, "--max-length", help=h("max_length")),
    micro_batch_tokens: Optional[int] = typer.Option(None, "--micro-batch-tokens", help=h("micro_batch_tokens")),
    seed: Optional[int] = typer.Option(None, "--seed", help=h("seed")),
    patience: Optional[int] = typer.Option(None, "--patience", help=h("patience")),
    eval_every_steps: Optional[int] = typer.Option(None, "--eval-every-steps", help=h("eval_every_steps")),
    save_every_steps: Optional[int] = typer.Option(None, "--save-every-steps", help=h("save_every_steps")),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                          help=h("gradient_checkpointing")),
    precision: Optional[str] = typer.Option(None, "--precision", help=h("precision")),
    warmup_ratio: Optional[float] = typer.Option(None, "--warmup-ratio", help=h("warmup_ratio")),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help=h("weight_decay")),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help=h("max_grad_norm")),
    balance: Optional[float] = typer.Option(None, "--balance", help=h("balance")),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", help=h("max_examples")),
    max_val_examples: Optional[int] = typer.Option(None, "--max-val-examples", help=h("max_val_examples")),
    launcher: Optional[str] = typer.Option(None, "--launcher", help=h("launcher")),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", help=h("num_processes")),
    accelerate_config: Optional[str] = typer.Option(None, "--accelerate-config", help=h("accelerate_config")),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="YAML file with any of these settings (flags given here override it)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted fine-tune of this name from its "
                                                        "last checkpoint (its stored settings are used)."),
    search_trials: Optional[int] = typer.Option(None, "--search", metavar="N",
                                                help="Search the hyperparameters on the validation split with N "
                                                     "trials (Optuna: TPE sampler, median pruner on each epoch's "
                                                     "validation); the best trial becomes ft:NAME. Run again to "
                                                     "continue a killed search."),
    search_minutes: Optional[float] = typer.Option(None, "--search-minutes", metavar="M",
                                                   help="Search budget in minutes (with or instead of --search N; "
                                                        "a running trial is finished)."),
    search_space: Optional[Path] = typer.Option(None, "--search-space",
                                                help="YAML file of the search space: lr, epochs ([low, high]); "
                                                     "lora_r, lora_alpha_ratio, target_modules, base, balance "
                                                     "(choices)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Fine-tune a model (LoRA or full) on a dataset, rendered by a prompt: the result is the model
    ft:NAME that run, eval, compare and serve accept. Unset settings are chosen from the data and
    printed before training starts."""
    from tunelab.finetune import load_config
    from tunelab.finetune.launch import run


    flags = dict(data=data, prompt=prompt, name=name, base=base, method=method, head=head, lr=lr, batch_size=batch_size,
                 grad_accum=grad_accum, epochs=epochs, max_steps=max_steps, lora_r=lora_r, lora_alpha=lora_alpha,
                 lora_dropout=lora_dropout, target_modules=target_modules, max_length=max_length,
                 micro_batch_tokens=micro_batch_tokens, seed=seed, patience=patience,
                 eval_every_steps=eval_every_steps, save_every_steps=save_every_steps,
                 gradient_checkpointing=gradient_checkpointing, precision=precision, warmup_ratio=warmup_ratio,
                 weight_decay=weight_decay, max_grad_norm=max_grad_norm, balance=balance, max_examples=max_examples,
                 max_val_examples=max_val_examples, launcher=launcher, num_processes=num_processes,
                 accelerate_config=accelerate_config)
    cfg = load_config(config, flags)

    def log(line: str) -> None:
        err_console.print(line, markup=False, highlight=False, soft_wrap=True)

    searched = None
    if search_trials is not None or search_minutes is not None or search_space is not None:
        from tunelab.finetune.search import load_space, search

        if cfg.launcher != "local":
            raise UserError("a search runs its trials in this process: drop --launcher", field="launcher")
        searched = search(workspace(), cfg, trials=search_trials, minutes=search_minutes,
                          space=load_space(search_space), progress=not as_json, log=log)
        result = searched.best
    else:
        result = run(workspace(), cfg, resume=resume, progress=not as_json, log=log)
    if as_json:
        print_json({**result.to_dict(curves=False), **({"search": searched.summary()} if searched else {})})
        return
    if searched is not None:
        pruned = sum(t["state"] == "pruned" for t in searched.trials)
        console.print(f"search: {len(searched.trials)} trials ({pruned} pruned) in {searched.wall_s:.0f} s; best "
                      f"trial {searched.best_trial} -> ft:{result.name} (plot: "
                      f"{workspace().artifacts_dir / 'searches' / result.name / 'search.png'})", markup=False)
    console.print(f"ft:{result.name}: {result.steps} steps ({result.epochs_run:g} epochs"
                  + (", stopped early" if result.stopped_early else "") + f") in {result.wall_s:.0f} s, "
                  f"{result.tokens_trained:,} tokens at {result.tokens_per_s:.0f} tokens/s, cost ${result.cost:.4f}",
                  markup=False)
    if result.validation:
        v = result.validation
        metrics = ", ".join(f"{k} {val:.4f}" for k, val in (v.get("metrics") or {}).items() if val is not None)
        console.print(f"best validation at step {v['step']}: loss {v['loss']:.4f}" + (f", {metrics}" if metrics else ""),
                      markup=False)
    ws = workspace()
    console.print(f"artifacts: {ws.artifacts_dir / result.path} (curves.png, curves.json, metadata.json)",
                  markup=False)
    console.print(f"try: tunelab eval ft:{result.name} --data {result.dataset.split('@')[0]}:test", markup=False)


def export(
    model: str = typer.Argument(..., help="The fine-tuned model: ft:NAME (or NAME)."),
    format: str = typer.Option("merged", "--format", "-f",
                               help="adapter (the LoRA adapter), merged (a standalone Hugging Face folder), "
                                    "gguf (the merged model as one f16 GGUF file for llama.cpp) or gguf-lora "
                                    "(the LoRA adapter as a llama.cpp adapter GGUF, to load over the base GGUF)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (must not exist or be empty); "
                                                      "for gguf and gguf-lora a .gguf file or a folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the written path as JSON on stdout."),
) -> None:
    """Export a fine-tuned model as an adapter, merged weights or GGUF files (model or LoRA adapter)."""
    from tunelab.finetune import export as run_export


    path = run_export(workspace(), model, format, out)
    if as_json:
        print_json({"model": model, "format": format, "path": str(path)})
        return
    console.print(f"wrote {format} of {model} to {path}", markup=False)
