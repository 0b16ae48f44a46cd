"""The gateway: OpenAI-compatible `/v1/chat/completions` and `/v1/models`, where `model` names a
deployment — and a deployment **is** a candidate: what is served is what was measured.

    support-router@production   a prompt at a label (or a version), on the prompt's model
    support-router              the prompt's working file
    ft:NAME                     a fine-tuned model with the prompt it was trained and evaluated with
    hybrid:NAME                 a hybrid (fine-tuned first, the prompt where it is unsure)
    smollm2-135m | fake | ...   a model of the workspace answering the raw chat (not a candidate)

A candidate deployment is resolved by the evaluator's `resolve_candidate` and answers through
`Candidate.predict`, exactly as `tunelab eval` measured it: the same rendering, demos, label
scoring and, at temperature > 0, the same seeded draw (the request's `seed` is the repeat index;
none: 0). Its settings are the measured ones: a request's `temperature`, `max_tokens` or `stop`
is not applied to a candidate (the response's `tunelab.ignored` lists what was ignored); change
them with a new prompt version. The example answered is `tunelab_variables` (an object; its
`input` is the input), else the last user message.

Concurrent calls to a local model are micro-batched (`BatchedModel`): requests that arrive while the
model is busy share its next batched forward pass. Deployments and their batchers live in the app's
`Deployments` table; `forget()` (after a deploy, when labels point elsewhere) drops both.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import NotFound, UserError
from tunelab.evaluate import Candidate, PromptCandidate, example_for, list_hybrids, request_cost, resolve_candidate
from tunelab.finetune import list_finetunes
from tunelab.models import Model, load_model
from tunelab.models.base import Completion, WrappedModel
from tunelab.models.base import Request as ModelRequest
from tunelab.models.weights import BUNDLED_ALIASES
from tunelab.prompts import list_labels
from tunelab.server.auth import KeyInfo, require

if TYPE_CHECKING:
    from tunelab.workspace import Pricing, Workspace

router = APIRouter()
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")
BUILTIN_MODELS = {"fake", *BUNDLED_ALIASES}
UNBATCHED_BACKENDS = {"openai", "fake"}  # they take concurrent calls themselves


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=8192)
    seed: int | None = None
    stop: list[str] | str | None = None
    stream: bool = False
    tunelab_variables: dict[str, Any] | None = None


# -- micro-batching -------------------------------------------------------------------------------
class BatchedModel(WrappedModel):
    """A model whose concurrent `complete()` calls are answered together: calls that arrive while
    it is busy go into its next batch (at most `max_batch` requests), one batch at a time. Answers
    are the wrapped model's; only the batch composition changes (in fp32 that changes nothing, in
    bf16 a close label can rarely flip — the same holds for evaluation batches)."""

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
    kind: str  # prompt | ft | hybrid | model
    pricing: "Pricing"
    candidate: Candidate | None = None
    model: Model | None = None
    version: str | None = None  # the prompt version, for prompt and ft deployments

    def answer(self, messages: list[dict], variables: dict[str, Any], params: dict[str, Any]) -> tuple[Completion, list[str]]:
        """The completion for a chat request, and the request settings that were not applied."""
        if self.candidate is None:
            return self.model.complete([ModelRequest(messages=messages, **params)])[0], []
        ignored = [k for k in ("temperature", "max_tokens", "stop") if k in params
                   and not (k == "temperature" and params[k] == self.candidate.temperature)]
        comp = self.candidate.predict([example_for(messages, variables)], int(params.get("seed") or 0))[0]
        return comp, ignored


@dataclass
class Deployments:
    """The app's deployments, resolved on first use, and the micro-batchers of their models."""

    workspace: "Workspace"
    _deployed: dict[str, Deployment] = field(default_factory=dict)
    _batchers: dict[int, BatchedModel] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, name: str) -> Deployment:
        with self._lock:
            if name not in self._deployed:
                self._deployed[name] = self._resolve(name)
            return self._deployed[name]

    def forget(self) -> None:
        """Drop every deployment and stop their batchers (after a deploy: labels point elsewhere)."""
        with self._lock:
            self._deployed.clear()
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
        base = name.split("@", 1)[0]
        if name.startswith(("ft:", "hybrid:")) or "@" in name or (ws.prompts_dir / f"{base}.prompt").is_file():
            cand = resolve_candidate(ws, name, free_text=False).map_models(self.batched)
            version = cand.prompt.version if isinstance(cand, PromptCandidate) else None
            return Deployment(name, cand.kind, ws.pricing_for(cand.model_name, cand.backend), candidate=cand,
                              version=version)
        model = load_model(name, ws)
        return Deployment(name, "model", ws.pricing_for(model.name, model.backend), model=self.batched(model))


def check_deployment_name(workspace: "Workspace", name: str) -> None:
    """Only names of this workspace's deployments: prompts, `ft:`/`hybrid:` names, configured models
    and the built-in ones. Raw paths (`local:PATH`, `../x`) never reach the loader."""
    if name == workspace.config.default_model or name in workspace.config.models or name in BUILTIN_MODELS:
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
    names.append(workspace.config.default_model)
    return list(dict.fromkeys(names))


# -- the OpenAI-compatible endpoints --------------------------------------------------------------
@router.get("/v1/models")
def list_models(request: Request, key: KeyInfo = Depends(require("viewer"))):
    names = deployment_names(request.app.state.workspace)
    return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "tunelab"} for n in names]}


@router.post("/v1/chat/completions")
def chat_completions(request: Request, body: ChatRequest, key: KeyInfo = Depends(require("viewer"))):
    state = request.app.state
    try:
        dep = state.deployments.get(body.model)
    except NotFound as exc:
        raise HTTPException(404, detail={"message": str(exc), "type": "not_found"}) from None
    except UserError as exc:
        raise HTTPException(400, detail={"message": str(exc), "type": "invalid_request"}) from None
    params: dict[str, Any] = {k: v for k, v in (("temperature", body.temperature), ("max_tokens", body.max_tokens),
                                                ("seed", body.seed)) if v is not None}
    if body.stop:
        params["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    variables = dict(body.tunelab_variables or {})
    record = {"key_name": key.name, "deployment": body.model, "kind": dep.kind, "prompt_version": dep.version,
              "messages": messages, "variables": _jsonable(variables),
              "meta": {"params": params, "stream": body.stream}}
    started = time.perf_counter()
    try:
        comp, ignored = dep.answer(messages, variables, params)
    except UserError as exc:
        state.log_call(**record, status="error", error=str(exc), latency_s=time.perf_counter() - started)
        raise HTTPException(400, detail={"message": str(exc), "type": "invalid_request"}) from None
    except Exception as exc:  # a model that fails is logged and answered as a 500, never silently
        state.log_call(**record, status="error", error=f"{type(exc).__name__}: {exc}",
                       latency_s=time.perf_counter() - started)
        raise HTTPException(500, detail={"message": "the deployment failed to answer", "type": "server_error"}) from None
    state.log_call(**record, output=comp.text, prompt_tokens=comp.prompt_tokens,
                   completion_tokens=comp.completion_tokens, latency_s=comp.latency_s or (time.perf_counter() - started),
                   cost=request_cost(dep.pricing, comp), status="ok")
    created = int(time.time())
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    usage = {"prompt_tokens": comp.prompt_tokens, "completion_tokens": comp.completion_tokens,
             "total_tokens": comp.prompt_tokens + comp.completion_tokens}
    if body.stream:
        def events():
            head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model}
            for delta, finish in (({"role": "assistant"}, None), ({"content": comp.text}, None), ({}, "stop")):
                chunk = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                if finish:
                    chunk["usage"] = usage
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
    extra: dict[str, Any] = {"latency_s": comp.latency_s, "label_logprobs": comp.label_logprobs,
                             "prompt_version": dep.version, "kind": dep.kind}
    if ignored:
        extra["ignored"] = ignored
    if comp.meta.get("route"):
        extra["route"] = {k: v for k, v in comp.meta.items() if k.startswith("route")}
    return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": comp.text}, "finish_reason": "stop"}],
            "usage": usage, "tunelab": extra}


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str))
