"""The gateway: OpenAI-compatible `/v1/chat/completions`, `/v1/models` and `/v1/models/{id}`, and
`/v1/feedback`, where `model` names a deployment — and a deployment **is** a candidate: what is served is what was
measured (`tunelab.server.deployments`). What a request may ask and what it gets is in
`tunelab.server.chat`; the order of checks is:

1. the key (401), before the body is read; the body's size (413, `create_app(max_body=...)`);
2. the body: JSON, fields, roles, content parts, tools (400, OpenAI's error shape);
3. the deployment: known (404) and one the key may call (403: an `app` key limited to some); its
   rollout (`tunelab.server.rollout`) picks the arm: the primary candidate, or a canary;
4. what it can honour: `response_format`, settings it applies or ignores, `logprobs`;
5. the context: the rendered messages against the model's context length (400
   `context_length_exceeded`), before any model runs;
6. the answer: `n` choices (choice i with seed `seed + i`), whole or streamed as generated
   (`stream: true`: server-sent events, `Cache-Control: no-cache`; free text token by token from
   a backend that streams, labels in one piece); every call logged (`tunelab.lifecycle.calls`, inputs
   clipped with their full size recorded) with its id, arm and candidate;
7. the shadows: a shadow's answer (and the primary's, on a canary's call) is queued for the
   background, never waited for (`ShadowQueue`).

Every answer's `id` is the call's id, also sent as the header `X-Tunelab-Call-Id`: feedback on the
call is `POST /v1/feedback {"call_id", "score" (0-1), "correction", "note"}` (an `app` or
`viewer` key: its own calls; editors and admins: any call).

The response's `tunelab` object says what was served: `kind`, `prompt_version`, `arm` and
`candidate` (the rollout's choice), `applied` and `ignored` (request settings the deployment did or
did not apply), `label_logprobs`, a hybrid's `route`, and `latency_s`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from tunelab.errors import NotFound, UserError, pydantic_message
from tunelab.evaluate import request_cost
from tunelab.lifecycle.calls import LOG_TEXT_CHARS, MAX_NOTE, add_feedback, answer_confidence, clip_call, get_call
from tunelab.lifecycle.rollouts import Rollout
from tunelab.models.base import Completion
from tunelab.server.auth import KeyInfo, require
from tunelab.server.chat import (ApiError, ChatRequest, asked_settings, chat_messages, comparable_schema, inert_fields,
                                 label_logprobs, parse_chat, refuse_unsupported, setting_names, usage)
from tunelab.server.deployments import Deployment, deployment_names
from tunelab.server.rollout import ShadowJob

if TYPE_CHECKING:
    from tunelab.models.base import Request as ModelRequest

router = APIRouter()
caller = require("app")
CALL_ID_HEADER = "X-Tunelab-Call-Id"


# -- models ----------------------------------------------------------------------------------------
def _model_entry(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "tunelab"}


@router.get("/v1/models")
def list_models(request: Request, key: KeyInfo = Depends(caller)):
    names = [n for n in deployment_names(request.app.state.workspace) if key.may_call(n)]
    return {"object": "list", "data": [_model_entry(n) for n in names]}


@router.get("/v1/models/{model_id:path}")
def get_model(request: Request, model_id: str, key: KeyInfo = Depends(caller)):
    state = request.app.state
    if not key.may_call(model_id):
        raise ApiError(404, f"The model '{model_id}' does not exist or this key may not call it",
                       param="model", code="model_not_found")
    if model_id not in deployment_names(state.workspace):
        _deployment(state, model_id)  # a version (NAME@VERSION) or a configured model: resolvable, else 404
    return _model_entry(model_id)


def _deployment(state, name: str) -> Deployment:
    try:
        return state.deployments.get(name)
    except NotFound as exc:
        raise ApiError(404, str(exc), param="model", code="model_not_found") from None
    except UserError as exc:
        raise ApiError(400, str(exc), param="model") from None


# -- chat completions ------------------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(request: Request, key: KeyInfo = Depends(caller)):
    raw = await request.body()
    req = parse_chat(raw)
    refuse_unsupported(req)
    messages = chat_messages(req)
    if not key.may_call(req.model):
        raise ApiError(403, f"key '{key.name}' may not call deployment '{req.model}' (it may call: "
                       f"{', '.join(key.deployments or [])})", type="permission_error", param="model",
                       code="deployment_not_allowed")
    return await run_in_threadpool(_complete, request, key, req, messages, len(raw))


def _complete(request: Request, key: KeyInfo, req: ChatRequest, messages: list[dict], size: int):
    state = request.app.state
    with state.shadows.serving():
        return _answer(state, key, req, messages, size)


def _answer(state, key: KeyInfo, req: ChatRequest, messages: list[dict], size: int):
    call_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    rollout: Rollout = state.rollouts.get(req.model)
    user = (req.model_extra or {}).get("user")
    arm = rollout.choose_arm(str(user) if user and rollout.sticky else key.name, call_id)
    spec = rollout.arm_candidate(arm)
    dep = _deployment(state, spec)
    applied, ignored = dep.settings(asked_settings(req))
    ignored = setting_names(ignored, req) + inert_fields(req)
    if user and rollout.sticky and rollout.canary and "user" in ignored:
        ignored.remove("user")  # it chose the caller's arm
    if req.logprobs and dep.output_type != "label":
        ignored.append("logprobs")  # free text has no log-probabilities here
    extra = _response_format(dep, req)
    variables = dict(req.tunelab_variables or {})
    seed = int(req.seed or 0)
    record = {"key_name": key.name, "deployment": req.model, "kind": dep.kind, "prompt_version": dep.version,
              "call_id": call_id, "arm": arm, "candidate": spec, "messages": messages, "variables": _jsonable(variables),
              "meta": {"params": {**applied, "seed": seed} if req.seed is not None else applied, "n": req.n,
                       "stream": req.stream, "ignored": ignored, "request_bytes": size,
                       "response_format": req.response_format.type if req.response_format else None}}
    started = time.perf_counter()

    def failed(exc: Exception) -> ApiError:
        if isinstance(exc, ApiError):
            error, api = exc.message, exc
        elif isinstance(exc, UserError):
            error, api = str(exc), ApiError(400, str(exc))
        else:  # a model that fails is logged and answered as a 500, never silently
            error = f"{type(exc).__name__}: {exc}"
            api = ApiError(500, "the deployment failed to answer", type="server_error")
        state.log_call(**clip_call(record, error=error), status="error", latency_s=time.perf_counter() - started)
        return api

    try:
        limit = _check_context(dep, messages, variables, seed, applied, extra)
    except Exception as exc:  # noqa: BLE001 - logged, then answered in OpenAI's shape
        raise failed(exc) from None
    info = {"kind": dep.kind, "prompt_version": dep.version, "arm": arm, "candidate": spec,
            "applied": setting_names(list(applied), req), "ignored": ignored}
    mirror = _mirror_jobs(rollout, arm, spec, call_id, req, messages, variables, seed)
    if req.stream:
        return _stream(state, dep, req, record, info, (messages, variables, seed, applied, extra), limit, started,
                       call_id, mirror)
    try:
        comps = [dep.answer(messages, variables, seed + i, applied, extra) for i in range(req.n)]
    except Exception as exc:  # noqa: BLE001
        raise failed(exc) from None
    _log_ok(state, dep, record, comps, started)
    for job in mirror:
        state.shadows.submit(job)
    cid, created = call_id, int(time.time())
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": _logprobs(req, c), "finish_reason": _finish(dep, c, limit)} for i, c in enumerate(comps)]
    first = comps[0]
    info.update(latency_s=sum(c.latency_s for c in comps), label_logprobs=first.label_logprobs)
    if first.meta.get("route"):
        info["route"] = {k: v for k, v in first.meta.items() if k.startswith("route")}
    return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                         "system_fingerprint": _fingerprint(dep), "choices": choices, "usage": usage(comps),
                         "tunelab": info}, headers={CALL_ID_HEADER: call_id})


def _mirror_jobs(rollout: Rollout, arm: str, spec: str, call_id: str, req: ChatRequest, messages: list[dict],
                 variables: dict, seed: int) -> list[ShadowJob]:
    """The background answers this call asks for once it is answered: the primary's on a canary's
    call (to measure the canary's agreement), the shadow's on its share of the calls."""
    wanted = []
    if arm == "canary":
        wanted.append((rollout.answering, "baseline"))
    if rollout.mirrors(call_id) and rollout.shadow != spec:
        wanted.append((rollout.shadow, "shadow"))
    return [ShadowJob(call_id, req.model, cand, role, messages, dict(variables), seed, asked_settings(req))
            for cand, role in wanted]


# -- feedback --------------------------------------------------------------------------------------
class FeedbackBody(BaseModel):
    """`POST /v1/feedback`: what a caller (or a reviewer) says about one call."""

    model_config = ConfigDict(extra="forbid")
    call_id: str = Field(min_length=1, max_length=64, description="the response's id (header X-Tunelab-Call-Id)")
    score: float | None = Field(None, ge=0, le=1, description="1: the answer was right, 0: wrong")
    correction: str | None = Field(None, max_length=LOG_TEXT_CHARS, description="the correct output")
    note: str = Field("", max_length=MAX_NOTE)


@router.post("/v1/feedback")
async def feedback(request: Request, key: KeyInfo = Depends(caller)):
    raw = await request.body()
    try:
        body = FeedbackBody.model_validate_json(raw or b"null")
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        raise ApiError(400, pydantic_message(exc, FeedbackBody), param=param) from None
    if body.score is None and body.correction is None:
        raise ApiError(400, "feedback needs a score (0 to 1) or the correct output ('correction'), or both",
                       param="score")
    return await run_in_threadpool(_feedback, request.app.state.workspace, key, body)


def _feedback(ws, key: KeyInfo, body: FeedbackBody) -> dict[str, Any]:
    call = get_call(ws, body.call_id)
    if call is None:
        raise ApiError(404, f"no call '{body.call_id}' (the id is a response's 'id', also sent as {CALL_ID_HEADER})",
                       param="call_id", code="call_not_found")
    if call.key_name != key.name and not key.can("editor"):
        raise ApiError(403, f"call '{body.call_id}' was made with another key: a key gives feedback on its own calls "
                       "(editors and admins on any call)", type="permission_error", param="call_id",
                       code="not_your_call")
    fb = add_feedback(ws, body.call_id, score=body.score, correction=body.correction, note=body.note,
                      author=key.name)
    return {"object": "feedback", "call_id": body.call_id, **fb.to_dict()}


def _response_format(dep: Deployment, req: ChatRequest) -> dict[str, Any]:
    """What `response_format` asks of the model request (a raw model's constraint), or a 400."""
    rf = req.response_format
    if rf is None or rf.type == "text":
        return {}
    schema = (rf.json_schema.schema_ if rf.json_schema else None) or {"type": "object"}
    if rf.type == "json_schema":
        import jsonschema

        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ApiError(400, f"response_format.json_schema: invalid JSON schema: {exc.message}",
                           param="response_format.json_schema") from None
    if dep.candidate is not None:  # the candidate decides: its prompt's output is what was measured
        if dep.output_type != "json":
            raise ApiError(400, f"deployment '{dep.name}' answers {dep.output_type} (its prompt's output); "
                           f"response_format {rf.type} needs a deployment whose prompt's output is JSON",
                           param="response_format", code="unsupported_response_format")
        own = dep.candidate.output.schema
        if rf.type == "json_schema" and comparable_schema(schema) != comparable_schema(own or {}):
            raise ApiError(400, f"deployment '{dep.name}' answers JSON {'matching its prompt schema' if own else 'without a schema'}"
                           f", not the requested schema '{rf.json_schema.name}' (it serves what was measured: put "
                           "that schema in the prompt's output.schema, evaluate it and deploy the version)",
                           param="response_format.json_schema", code="unsupported_response_format")
        return {}
    if not dep.model.constrains_json:
        raise ApiError(400, f"model '{dep.name}' ({dep.model.backend} backend) cannot constrain its answer to JSON, "
                       f"so response_format {rf.type} cannot be honoured; call a deployment whose prompt's output "
                       "is JSON, or a model whose backend constrains JSON (llamacpp)",
                       param="response_format", code="unsupported_response_format")
    return {"json_schema": schema, "constrained": True}


def _check_context(dep: Deployment, messages, variables, seed, applied, extra) -> int | None:
    """400 `context_length_exceeded` when a rendered request does not fit its model's context,
    before any model runs; returns the answer's token limit (for finish_reason "length")."""
    pairs: list[tuple[Any, "ModelRequest"]] = dep.requests(messages, variables, seed, applied, extra)
    for model, req in pairs:
        limit = model.context_length
        if not limit:
            continue
        used = sum(model.count_tokens(m["content"]) + 4 for m in req.messages)
        if used >= limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, your messages "
                           f"resulted in {used} tokens. Shorten the messages.", param="messages",
                           code="context_length_exceeded")
    return pairs[0][1].max_tokens if pairs and not pairs[0][1].labels else None


def _finish(dep: Deployment, comp: Completion, limit: int | None) -> str:
    if limit and dep.output_type != "label" and comp.completion_tokens >= limit and not comp.meta.get("stopped"):
        return "length"
    return "stop"


def _logprobs(req: ChatRequest, comp: Completion) -> dict | None:
    return label_logprobs(comp, req.top_logprobs or 0) if req.logprobs else None


def _fingerprint(dep: Deployment) -> str:
    target = dep.candidate if dep.candidate is not None else dep.model
    return "tl-" + str(getattr(target, "fingerprint", ""))[:16]


def _log_ok(state, dep: Deployment, record: dict, comps: list[Completion], started: float, **meta: Any) -> None:
    first = comps[0]
    record = {**record, "meta": {**record["meta"], **meta}}
    if (confidence := answer_confidence(first)) is not None:  # label margin or token probability (drift)
        record["meta"]["confidence"] = confidence
    if first.meta.get("route"):
        record["meta"]["route"] = first.meta["route"]
    if len(comps) > 1:
        record["meta"]["choices"] = [c.text for c in comps[1:]]
    state.log_call(**clip_call(record, output=first.text), prompt_tokens=first.prompt_tokens,
                   completion_tokens=sum(c.completion_tokens for c in comps),
                   latency_s=sum(c.latency_s for c in comps) or (time.perf_counter() - started),
                   cost=sum(request_cost(dep.pricing, c) for c in comps), status="ok")


def _stream(state, dep: Deployment, req: ChatRequest, record: dict, info: dict, args: tuple, limit: int | None,
            started: float, call_id: str, mirror: list[ShadowJob]) -> StreamingResponse:
    """Server-sent events: each choice's text as it is generated, then its finish reason (and
    usage when `stream_options.include_usage`); the call is logged when the stream ends."""
    cid, created = call_id, int(time.time())
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
            "system_fingerprint": _fingerprint(dep)}
    items: queue.Queue = queue.Queue()
    messages, variables, seed, applied, extra = args

    def work() -> None:
        comps: list[Completion] = []
        try:
            with state.shadows.serving():
                answer_all(comps)
            items.put(("end", comps, None))
        except Exception as exc:  # noqa: BLE001 - sent as an error event and logged
            items.put(("error", exc, comps))

    def answer_all(comps: list[Completion]) -> None:
        for i in range(req.n):
            comp = dep.answer(messages, variables, seed + i, applied, extra,
                              emit=lambda text, i=i: items.put(("delta", i, text)))
            comps.append(comp)
            items.put(("done", i, comp))

    def chunk(choices: list[dict], **more: Any) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **more})}\n\n"

    def events():
        sent: dict[int, str] = {}
        logged = False
        try:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(req.n)])
            threading.Thread(target=work, daemon=True, name="tunelab-stream").start()
            while True:
                kind, a, b = items.get()
                if kind == "delta":
                    sent[a] = sent.get(a, "") + b
                    yield chunk([{"index": a, "delta": {"content": b}, "logprobs": None, "finish_reason": None}])
                elif kind == "done":
                    yield chunk([{"index": a, "delta": {}, "logprobs": _logprobs(req, b),
                                  "finish_reason": _finish(dep, b, limit)}])
                elif kind == "error":  # the headers are sent: the error is an event, as OpenAI sends it
                    user = isinstance(a, UserError)
                    error = {"message": str(a) if user else "the deployment failed to answer",
                             "type": "invalid_request_error" if user else "server_error", "param": None, "code": None}
                    state.log_call(**clip_call(record, error=f"{type(a).__name__}: {a}"), status="error",
                                   latency_s=time.perf_counter() - started)
                    logged = True
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    return
                else:
                    comps = a
                    mismatch = [i for i, c in enumerate(comps) if sent.get(i, "") != c.text]
                    _log_ok(state, dep, record, comps, started, **({"stream_mismatch": mismatch} if mismatch else {}))
                    logged = True
                    for job in mirror:
                        state.shadows.submit(job)
                    if req.stream_options and req.stream_options.include_usage:
                        yield chunk([], usage=usage(comps), tunelab={**info, "latency_s": sum(c.latency_s for c in comps)})
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not logged:
                state.log_call(**clip_call(record, error="the client closed the stream"), status="error",
                               latency_s=time.perf_counter() - started)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", CALL_ID_HEADER: call_id})


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str))
