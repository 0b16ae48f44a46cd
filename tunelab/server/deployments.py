"""What a gateway `model` name answers with: a deployment, which **is** a candidate.

    support-router@production   a prompt at a label (or a version), on the prompt's model
    support-router              the prompt's working file
    ft:NAME                     a fine-tuned model with the prompt it was trained and evaluated with
    hybrid:NAME                 a hybrid (fine-tuned first, the prompt where it is unsure)
    smollm2-135m | fake | ...   a model of the workspace answering the raw chat (not a candidate)

A candidate deployment is resolved by the evaluator's `resolve_candidate` and answers through
`Candidate.predict` (or `Candidate.stream`, the same answer handed over as it is generated),
exactly as `tunelab eval` measured it: the same rendering, demos, label scoring and, at
temperature > 0, the same seeded draw (the request's `seed` is the repeat index; none: 0).

Its settings are the measured ones. A request's `temperature`, `max_tokens` (or
`max_completion_tokens`) and `stop` apply only where the deployment allows it: a label's
`overrides` (`tunelab prompt tag ... --allow-override temperature`, default none); the others are
not applied and the response lists them under `tunelab.ignored` (the applied ones under
`tunelab.applied`). A raw model applies them all.

Concurrent calls to a local model are micro-batched (`BatchedModel`): requests that arrive while the
model is busy share its next batched forward pass. Deployments and their batchers live in the app's
`Deployments` table; `forget()` (after a deploy, when labels point elsewhere) drops both.
"""

from __future__ import annotations

import queue
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from tunelab.errors import NotFound, UserError
from tunelab.evaluate import (Candidate, PromptCandidate, example_for, list_baselines, list_hybrids, parse_baseline,
                              resolve_candidate)
from tunelab.finetune import list_finetunes
from tunelab.models import Model, load_model
from tunelab.models.base import Completion, WrappedModel
from tunelab.models.base import Request as ModelRequest
from tunelab.models.weights import BUNDLED_ALIASES
from tunelab.prompts import OVERRIDABLE, label_overrides, list_labels

if TYPE_CHECKING:
    from tunelab.workspace import Pricing, Workspace

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")
BUILTIN_MODELS = {"fake", *BUNDLED_ALIASES}
UNBATCHED_BACKENDS = {"openai", "fake"}  # they take concurrent calls themselves
RAW_DEFAULTS = {"max_tokens": 256}  # a raw model's answer when the request sets no max_tokens


# -- micro-batching -------------------------------------------------------------------------------
class BatchedModel(WrappedModel):
    """A model whose concurrent `complete()` calls are answered together: calls that arrive while
    it is busy go into its next batch (at most `max_batch` requests), one batch at a time. Answers
    are the wrapped model's; only the batch composition changes (in fp32 that changes nothing, in
    bf16 a close label can rarely flip — the same holds for evaluation batches). A stream goes to
    the wrapped model directly (it takes the model's lock for its generation)."""

    def __init__(self, model: Model, max_batch: int = 32):
        super().__init__(model)
        self.max_batch = max_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"tunelab-batcher-{model.name}")
        self._thread.start()

    def complete(self, requests: list[ModelRequest]) -> list[Completion]:
        item = {"requests": list(requests), "done": threading.Event(), "result": None, "error": None}
        self._queue.put(item)
        item["done"].wait()
        if item["error"] is not None:
            raise item["error"]
        return item["result"]

    def stream(self, request: ModelRequest, emit: Callable[[str], None]) -> Completion:
        return self.inner.stream(request, emit)

    def close(self) -> None:
        """Stop the batching thread (the wrapped model stays loaded: other deployments share it)."""
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            items = [first]
            size = len(first["requests"])
            while size < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                items.append(nxt)
                size += len(nxt["requests"])
            try:
                results = self.inner.complete([r for it in items for r in it["requests"]])
                start = 0
                for it in items:
                    it["result"] = results[start:start + len(it["requests"])]
                    start += len(it["requests"])
            except BaseException as exc:  # noqa: BLE001 - every waiting call gets the error
                for it in items:
                    it["error"] = exc
            for it in items:
                it["done"].set()


# -- deployments ----------------------------------------------------------------------------------
@dataclass
class Deployment:
    """What a `model` name answers with: a candidate (prompt, ft, hybrid), or a raw model."""

    name: str
    kind: str  # prompt | ft | hybrid | baseline | model
    pricing: "Pricing"
    candidate: Candidate | None = None
    model: Model | None = None
    version: str | None = None  # the prompt version, for prompt and ft deployments
    overrides: tuple[str, ...] = ()  # the request settings clients may set (a label's setting)

    @property
    def output_type(self) -> str:
        """label | json | text (a raw model: text)."""
        return self.candidate.output.type if self.candidate is not None else "text"

    def settings(self, asked: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """(the request settings this deployment applies, the names of those it does not). A raw
        model applies all; a candidate those its label allows, and a temperature equal to its own."""
        if self.candidate is None:
            return dict(asked), []
        applied = {k: v for k, v in asked.items() if k in self.overrides}
        ignored = [k for k, v in asked.items() if k not in applied
                   and not (k == "temperature" and v == self.candidate.temperature)]
        return applied, ignored

    def requests(self, messages: list[dict], variables: dict[str, Any], seed: int, applied: dict[str, Any],
                 extra: dict[str, Any]) -> list[tuple[Model, ModelRequest]]:
        """The model requests answering this chat request makes (for the context-length check)."""
        if self.candidate is None:
            return [(self.model, ModelRequest(messages=messages, seed=seed, **{**RAW_DEFAULTS, **applied}, **extra))]
        return self._candidate(applied).model_requests(example_for(messages, variables), seed)

    def answer(self, messages: list[dict], variables: dict[str, Any], seed: int, applied: dict[str, Any],
               extra: dict[str, Any], emit: Callable[[str], None] | None = None) -> Completion:
        """One completion (repeat index / seed `seed`); with `emit`, its text is handed over as it
        is generated (the same answer)."""
        if self.candidate is None:
            req = ModelRequest(messages=messages, seed=seed, **{**RAW_DEFAULTS, **applied}, **extra)
            return self.model.stream(req, emit) if emit else self.model.complete([req])[0]
        cand, example = self._candidate(applied), example_for(messages, variables)
        return cand.stream(example, seed, emit) if emit else cand.predict([example], seed)[0]

    def _candidate(self, applied: dict[str, Any]) -> Candidate:
        cand = self.candidate
        if applied and isinstance(cand, PromptCandidate):
            cand = cand.with_settings(**applied)
        return cand


@dataclass
class Deployments:
    """The app's deployments, resolved on first use, and the micro-batchers of their models."""

    workspace: "Workspace"
    _deployed: dict[str, Deployment] = field(default_factory=dict)
    _batchers: dict[int, BatchedModel] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    generation: int = 0  # moves whenever a resolved deployment is dropped (a shadow worker process follows it)

    def get(self, name: str) -> Deployment:
        with self._lock:
            if name not in self._deployed:
                self._deployed[name] = self._resolve(name)
            return self._deployed[name]

    def drop(self, name: str) -> None:
        """Resolve `name` again on its next call (a label or a rollout moved); the batchers stay."""
        with self._lock:
            self._deployed.pop(name, None)
            self.generation += 1

    def forget(self) -> None:
        """Drop every deployment and stop their batchers (after a deploy: labels point elsewhere)."""
        with self._lock:
            self._deployed.clear()
            self.generation += 1
            batchers, self._batchers = list(self._batchers.values()), {}
        for b in batchers:
            b.close()

    def batched(self, model: Model) -> Model:
        """`model` behind its one micro-batcher (remote and fake models as they are)."""
        if model.backend in UNBATCHED_BACKENDS or isinstance(model, BatchedModel):
            return model
        key = id(model)
        if key not in self._batchers:
            self._batchers[key] = BatchedModel(model)
        return self._batchers[key]

    def _resolve(self, name: str) -> Deployment:
        ws = self.workspace
        check_deployment_name(ws, name)
        base, _, at = name.partition("@")
        if name.startswith(("ft:", "hybrid:", "baseline:")) or at or (ws.prompts_dir / f"{base}.prompt").is_file():
            cand = resolve_candidate(ws, name, free_text=False).map_models(self.batched)
            version = cand.prompt.version if isinstance(cand, PromptCandidate) else None
            overrides = tuple(label_overrides(ws, base, at) or ()) if at and cand.kind == "prompt" else ()
            return Deployment(name, cand.kind, ws.pricing_for(cand.model_name, cand.backend), candidate=cand,
                              version=version, overrides=tuple(o for o in overrides if o in OVERRIDABLE))
        model = load_model(name, ws)
        return Deployment(name, "model", ws.pricing_for(model.name, model.backend), model=self.batched(model))


def check_deployment_name(workspace: "Workspace", name: str) -> None:
    """Only names of this workspace's deployments: prompts, `ft:`/`hybrid:` names, configured models
    and the built-in ones. Raw paths (`local:PATH`, `../x`) never reach the loader."""
    if name == workspace.config.default_model or name in workspace.config.models or name in BUILTIN_MODELS:
        return
    if name.startswith("baseline:"):
        try:
            parse_baseline(name)  # METHOD[-nN][:DATASET[@VERSION]], safe names only
        except UserError:
            raise NotFound(f"unknown model or deployment '{name}' (see GET /v1/models)") from None
        return
    base, _, at = name.partition("@")
    kind, _, rest = base.partition(":") if ":" in base else ("", "", base)
    ok = SAFE_NAME.fullmatch(rest) is not None and ".." not in rest and (not at or SAFE_NAME.fullmatch(at))
    if kind not in ("", "ft", "hybrid") or (kind and at):
        ok = False
    if ok and not kind and not at:
        ok = (workspace.prompts_dir / f"{rest}.prompt").is_file()
    if not ok:
        raise NotFound(f"unknown model or deployment '{name}' (see GET /v1/models)")


def deployment_names(workspace: "Workspace") -> list[str]:
    """What `/v1/models` lists: labelled prompt versions, prompts' working files, finished
    fine-tunes, hybrids, and the default model."""
    names = [f"{name}@{label}" for name, label, _ in list_labels(workspace)]
    names += [p.stem for p in sorted(workspace.prompts_dir.glob("*.prompt"))] if workspace.prompts_dir.is_dir() else []
    names += [f"ft:{row.name}" for row in list_finetunes(workspace) if row.status == "done"]
    names += [f"hybrid:{spec.name}" for spec in list_hybrids(workspace)]
    names += list_baselines(workspace)
    names.append(workspace.config.default_model)
    return list(dict.fromkeys(names))
