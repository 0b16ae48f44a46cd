"""`tunelab flow DATA_DIR`: the whole flow (the steps of `tunelab demo`) on your own data: labels,
JSON extraction or free text, inferred from the train outputs.

    tunelab flow data/tickets [--dir DIR] [--task TEXT] [--field NAME] [--schema FILE] [--epochs N] [--quick]

Thin: tunelab.demo.flow_for builds the flow for the data, tunelab.demo.run_flow runs it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from tunelab.cli._common import console, err_console


def _log(message: str) -> None:
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)  # paths stay whole, to copy


def flow(
    data_dir: Path = typer.Argument(..., help="Your labelled data: a data file, or a folder with train, validation and "
                                    "test files (.jsonl with input/output fields, or .csv); missing validation and "
                                    "test splits are split off train (seeded, stratified, 10% each)."),
    directory: Optional[Path] = typer.Option(None, "--dir", help="The workspace for the flow (made if missing, reused "
                                             "if there; default ./tunelab-flow-NAME, NAME from the data file or folder)."),
    task: Optional[str] = typer.Option(None, "--task", help="The question the baseline prompt asks, in your words "
                                       "(default: 'Which label fits this text?'; JSON: 'Extract the fields of this "
                                       "text as a JSON object.'; text: 'Write the answer for this input.')."),
    field: str = typer.Option("Text", "--field", help="What the prompts call the input, e.g. Message, Ticket, Tweet "
                              "(text outputs: Input)."),
    schema: Optional[Path] = typer.Option(None, "--schema", help="JSON outputs: the JSON Schema file the answers must "
                                          "match (default: inferred from the train outputs with genson)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Fine-tuning epochs over the train split "
                                         "(default 1; skewed labels whose other labels have few examples: up to 3, "
                                         "until those have been seen ~50 times)."),
    budget: Optional[int] = typer.Option(None, "--budget", min=1, help="Prompt optimization: candidates to evaluate "
                                         "(default 8; 4 with more than 40 labels)."),
    limit_validation: Optional[int] = typer.Option(None, "--limit-validation", min=1, help="Prompt optimization: "
                                                   "score candidates on the first N validation examples (default "
                                                   "150; 100 with more than 40 labels, also the fine-tune's "
                                                   "validation)."),
    learning_curve: Optional[bool] = typer.Option(None, "--learning-curve/--no-learning-curve", help="Learning "
                                                  "curves of every trainable candidate on 10/25/50/100% of train "
                                                  "(default: those that fit what is left of --minutes "
                                                  "after the comparison, the baselines always; --learning-curve: "
                                                  "all, the fine-tune retrained too)."),
    minutes: float = typer.Option(10.0, "--minutes", help="The flow's time budget in minutes: the learning curves "
                                  "measure only the series whose estimated time fits what is left of it (the "
                                  "report names the ones left out). The other steps always run."),
    volume: float = typer.Option(100_000, "--volume", help="Expected requests a month for the cost model and advice."),
    quick: bool = typer.Option(False, "--quick", help="A tiny version: few examples, a few training steps (to try it out)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for the model (TUNELAB_THREADS)."),
    bases: str = typer.Option("smollm2-135m", "--bases", help="Base models to compare side by side, comma-separated "
                              "(bundled: smollm2-135m, gemma3-270m; or model folders): prompts and a fine-tune on "
                              "each; the advice names the base."),
    search: Optional[int] = typer.Option(None, "--search", metavar="N", help="Fine-tune by a hyperparameter search "
                                         "of N trials on the validation split (tunelab finetune --search)."),
    head: Optional[str] = typer.Option(None, "--head", help="classify: label tasks also fine-tune NAME-ft-head, LoRA "
                                       "plus a classification head (tunelab finetune --head classify), compared "
                                       "beside the generative fine-tune."),
    metric: Optional[str] = typer.Option(None, "--metric", help="What every step maximizes and the comparison ranks "
                                         "by (labels: accuracy, macro_f1; JSON: field_f1, json_match, ...; text: "
                                         "chrf, bleu, rouge_l, ...). Default: the type's (accuracy, field_f1, chrf), "
                                         "and macro_f1 for labels where one label is 60% of train or more."),
) -> None:
    """Run the whole flow on your data: check the data, a zero-shot baseline prompt (for JSON also
    decoded under the schema's grammar), prompt optimization, a LoRA fine-tune with a short prompt, a
    hybrid, the comparison on the test split and the advice; prints where the report is. The output
    type (labels, JSON, text) is inferred from the train outputs. Re-running in the same --dir reuses
    finished work."""
    from tunelab.errors import UserError
    from tunelab.flow import flow_for, run_flow

    if search is not None and search < 1:
        raise UserError(f"--search takes a number of trials of at least 1 (got {search})", field="search")
    spec = flow_for(data_dir, task=task, field=field, epochs=epochs, budget=budget, limit_validation=limit_validation,
                    schema=schema, bases=bases.split(","), search=search, head=head, metric=metric)
    if threads:
        os.environ["TUNELAB_THREADS"] = str(threads)
    run_flow(directory or Path(f"tunelab-flow-{spec.dataset}"), spec, quick=quick, volume=volume, log=_log,
             console=console, workspace_name=f"flow-{spec.dataset}", learning_curve=learning_curve, minutes=minutes)
