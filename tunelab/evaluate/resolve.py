"""From a candidate's name to the candidate: the one place every command, the comparison and the
gateway turn `PROMPT[@VERSION|@LABEL]`, `ft:NAME` or `hybrid:NAME` into something that answers.

    cand = resolve_candidate(ws, "support@production")   # the prompt version on its model
    cand = resolve_candidate(ws, "ft:support")           # the training prompt on the fine-tuned model
    cand = resolve_candidate(ws, "hybrid:support")       # both, routed per request
    answer(ws, "support", "I was charged twice")         # the playground: one input, one answer

A deployment of the gateway is a resolved candidate, so what is served is what was measured.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tunelab.datasets import Example
from tunelab.errors import UserError
from tunelab.evaluate.baselines import PREFIX, baseline_candidate
from tunelab.evaluate.candidates import Candidate, PromptCandidate
from tunelab.evaluate.routing import HybridCandidate, Routing, read_hybrid, train_inputs
from tunelab.metrics import Answer, FormatValid, parse_json
from tunelab.models import Model, load_model
from tunelab.models.finetuned import read_finetuned
from tunelab.prompts import SUFFIX, as_example, load_prompt, read_prompt_file

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

PRECISIONS = ("auto", "bf16", "fp32")


def resolve_candidate(ws: "Workspace", spec: str, model: str | Model | None = None, *,
                      free_text: bool = True, data: str | None = None) -> Candidate:
    """`PROMPT[@VERSION|@LABEL]` (on `model`, else the prompt's model, else the workspace default),
    `ft:NAME` (the fine-tune's training prompt on its model), `hybrid:NAME` or
    `baseline:METHOD[:DATASET[@VERSION]]` (a classical classifier trained on that train split, by
    default `data`'s: the dataset being evaluated). `free_text`: label candidates also ask for the
    model's unconstrained answer (the format-validity rate)."""
    spec = (spec or "").strip()
    if not spec:
        raise UserError("no candidate given (PROMPT[@VERSION], ft:NAME, hybrid:NAME or baseline:METHOD)")
    if spec.startswith(("ft:", "hybrid:", PREFIX)) and model is not None:
        raise UserError(f"'{spec}' picks its own models; --model applies to prompt candidates")
    if spec.startswith(PREFIX):
        return baseline_candidate(ws, spec, data)
    if spec.startswith("ft:"):
        return finetuned_candidate(ws, spec[3:], free_text=free_text)
    if spec.startswith("hybrid:"):
        return hybrid_candidate(ws, spec[7:])
    prompt = load_prompt(ws, spec)
    m = model if isinstance(model, Model) else load_model(model or prompt.model, ws)
    return PromptCandidate(prompt, m, workspace=ws, model_name=m.name if isinstance(model, Model)
                           else (model or prompt.model), free_text=free_text)


def finetuned_candidate(ws: "Workspace", name: str, *, free_text: bool = True) -> PromptCandidate:
    """`ft:NAME`: the prompt version it was trained with, on the fine-tuned model."""
    ft = read_finetuned(ws, name)
    cand = PromptCandidate(load_prompt(ws, ft.prompt), load_model(ft.spec, ws), workspace=ws, name=ft.spec,
                           kind="ft", model_name=ft.spec, free_text=free_text)
    cand.training_data = ft.dataset
    return cand


def hybrid_candidate(ws: "Workspace", name: str) -> HybridCandidate:
    """`hybrid:NAME`: its two sides resolved, its routing from the stored spec."""
    spec = read_hybrid(ws, name)
    primary, fallback = resolve_candidate(ws, spec.primary), resolve_candidate(ws, spec.fallback)
    inputs = train_inputs(ws, spec.train_data) if spec.similarity_threshold > 0 else None
    valid = format_check(primary.output) if primary.output.type == "json" else None
    return HybridCandidate(ws, spec, primary, fallback, Routing(spec, inputs, valid))


def format_check(output) -> Callable[[str], bool]:
    """Is an answer of `output` usable as is (the format_valid metric: JSON parses and matches the schema)?"""
    metric = FormatValid(output)
    return lambda text: bool(metric.score(Answer(expected="", prediction=text)))


def answer(ws: "Workspace | None", ref: str, example: Example | str, model: str | None = None,
           precision: str | None = None) -> dict[str, Any]:
    """The playground behind `tunelab run`: one input answered by the candidate `ref` (a prompt,
    a prompt file, `ft:NAME` or `hybrid:NAME`; `model` overrides a prompt's model), exactly as an
    evaluation or the gateway would answer it. Returns the output, tokens, latency, the messages
    and, for label outputs, the probability of each label (normalized over the labels)."""
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"--precision must be auto, bf16 or fp32 (got '{precision}')")
    options = {"precision": precision} if precision is not None else {}
    path = Path(ref)
    if ws is None or (path.suffix == SUFFIX and "@" not in ref):
        prompt = read_prompt_file(path, workspace=ws)
        backend = load_model(model or prompt.model, ws, **options)
        cand: Candidate = PromptCandidate(prompt, backend, workspace=ws, free_text=False)
    elif options and not ref.startswith(("ft:", "hybrid:")):
        prompt = load_prompt(ws, ref)
        cand = PromptCandidate(prompt, load_model(model or prompt.model, ws, **options), workspace=ws,
                               free_text=False)
    else:
        cand = resolve_candidate(ws, ref, model, free_text=False)
    ex = as_example(example)
    (completion,) = cand.predict([ex], 0)
    result: dict[str, Any] = {
        "candidate": cand.name, "prompt": cand.name, "model": cand.model_name, "output": completion.text,
        "prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
        "latency_s": completion.latency_s,
    }
    if isinstance(cand, PromptCandidate):
        result["messages"] = cand.requests([ex])[0].messages
    if completion.meta.get("route"):
        result["route"] = {k: v for k, v in completion.meta.items() if k.startswith("route") or k in ("margin",)}
    if completion.label_logprobs:
        top = max(completion.label_logprobs.values())
        weights = {k: math.exp(v - top) for k, v in completion.label_logprobs.items()}
        total = sum(weights.values()) or 1.0
        result["label_probs"] = {k: w / total for k, w in weights.items()}
    if cand.output.type == "json":
        ok, value = parse_json(completion.text)
        result["json_valid"] = ok
        if ok:
            result["json"] = value
    return result
