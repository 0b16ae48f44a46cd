"""The gateway: OpenAI-compatible `/v1/chat/completions` and `/v1/models`.

`model` names a deployment:

    support-router@production   a prompt at a label (or a version), on the prompt's model
    support-router              the prompt's working file
    ft:NAME                     a fine-tuned model (raw chat)
    hybrid:NAME                 a hybrid router
    smollm2-135m | fake | ...   any model spec `load_model` accepts (raw chat)

For a prompt deployment the template variables come from the extension field
`tunelab_variables` (an object), or else the last user message becomes `input`.

Every endpoint needs an API key (`Authorization: Bearer tl-...`, see `tunelab keys create`) or a
web UI session, and a role (`tunelab.server.auth`); `create_app(ws, auth=False)` opts out (tests of
the OpenAI wire format only). Each key is rate-limited (token bucket; 429 with Retry-After). Every
gateway call is logged in the store (`tunelab.server.logs`, group-committed: a call returns once
its row is written). Concurrent calls to a local model are micro-batched (`Batcher`): requests
that arrive while the model is busy share its next batched forward pass. The web UI lives in
`tunelab.server.ui`; background jobs in `tunelab.server.jobs`.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from tunelab.errors import NotFound, UserError
from tunelab.models.base import Completion, Request


from fastapi import Request as HttpRequest  # noqa: E402  (FastAPI reads annotations by name)
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402


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


@dataclass
class Deployment:
    name: str
    kind: str  # prompt | model | hybrid
    answer: Callable[[list[dict], dict, dict], Completion]
    version: str | None = None  # the prompt version, for prompt deployments
    pricing: Any = None  # the workspace pricing of the model that answers


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")


def check_deployment_name(workspace, name: str) -> None:
    """Only names of this workspace's deployments: prompts, `ft:`/`hybrid:` names, configured models
    and the built-in ones. Raw paths (`local:PATH`, `../x`) never reach the loader."""
    from tunelab.models import load_model  # noqa: F401  (the names below are its specs)

    if name == workspace.config.default_model or name in workspace.config.models or name in BUILTIN_MODELS:
        return
    base, _, at = name.partition("@")
    kind, _, rest = base.partition(":") if ":" in base else ("", "", base)
    ok = SAFE_NAME.fullmatch(rest) is not None and ".." not in rest and (not at or SAFE_NAME.fullmatch(at))
    if kind not in ("", "ft", "hybrid"):
        ok = False
    if ok and not kind and not at:
        ok = (workspace.prompts_dir / f"{rest}.prompt").is_file()
    if not ok:
        raise NotFound(f"unknown model or deployment '{name}' (see GET /v1/models)")


BUILTIN_MODELS = {"fake", "smollm2-135m"}


def resolve_deployment(workspace, name: str) -> Deployment:
    """The deployment called `name` (see the module doc)."""
    from tunelab.models import load_model

    check_deployment_name(workspace, name)
    if name.startswith("hybrid:"):
        from tunelab.datasets import Example
        from tunelab.router import load_router

        router = load_router(workspace, name[len("hybrid:"):])

        def answer_hybrid(messages, variables, params):
            example = Example(input=variables.get("input", _last_user(messages)), output="", meta=variables)
            return router.predict([example], 0)[0]

        return Deployment(name, "hybrid", answer_hybrid, pricing=_free())

    prompt_name = name.split("@", 1)[0]
    if ("@" in name or (workspace.prompts_dir / f"{prompt_name}.prompt").is_file()) and not name.startswith("ft:"):
        from tunelab.datasets import Example
        from tunelab.prompts import load_prompt

        prompt = load_prompt(workspace, name)
        model = load_model(prompt.model or workspace.config.default_model, workspace)
        demos = prompt.resolve_demos(workspace)
        complete = _completer(model)

        def answer_prompt(messages, variables, params):
            fields = dict(variables)
            inp = fields.pop("input", None)
            example = Example(input=inp if inp is not None else _last_user(messages), output="", meta=fields)
            return complete(prompt.request(example, demos, **params))

        return Deployment(name, "prompt", answer_prompt, version=prompt.version, pricing=_pricing(workspace, model))

    model = load_model(name, workspace)
    complete = _completer(model)

    def answer_model(messages, variables, params):
        return complete(Request(messages=messages, **params))

    return Deployment(name, "model", answer_model, pricing=_pricing(workspace, model))


def _pricing(workspace, model):
    return workspace.pricing_for(getattr(model, "name", ""), getattr(model, "backend", ""))


def _free():
    from tunelab.workspace import Pricing

    return Pricing()


_batchers: dict[int, "Batcher"] = {}
_batchers_lock = threading.Lock()


def _completer(model) -> Callable[[Request], Completion]:
    """How a deployment calls its model: remote and fake models take concurrent calls directly;
    a local model gets one `Batcher`, so concurrent calls share batched forward passes."""
    if getattr(model, "backend", "") in {"openai", "fake"}:
        return lambda request: model.complete([request])[0]
    with _batchers_lock:
        if id(model) not in _batchers:
            _batchers[id(model)] = Batcher(model)
        return _batchers[id(model)].complete


class Batcher:
    """Micro-batching: calls that arrive while the model is busy are answered together in the
    next `model.complete(batch)` (at most `max_batch`), one batch at a time."""

    def __init__(self, model, max_batch: int = 32):
        import queue

        self.model, self.max_batch = model, max_batch
        self._queue: "queue.Queue" = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name=f"tunelab-batcher-{getattr(model, 'name', '')}").start()

    def complete(self, request: Request) -> Completion:
        item = {"request": request, "done": threading.Event(), "result": None, "error": None}
        self._queue.put(item)
        item["done"].wait()
        if item["error"] is not None:
            raise item["error"]
        return item["result"]

    def _run(self) -> None:
        import queue

        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                results = self.model.complete([item["request"] for item in batch])
                for item, result in zip(batch, results):
                    item["result"] = result
            except BaseException as exc:  # noqa: BLE001 - every waiting call gets the error
                for item in batch:
                    item["error"] = exc
            for item in batch:
                item["done"].set()


def _last_user(messages: list[dict]) -> str:
    return next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")


def create_app(workspace, *, auth: bool = True, rate: float = 20.0, burst: int = 200, ui: bool = True,
               worker: bool = False):
    """The FastAPI app serving `workspace`: the gateway, the JSON API and the web UI.

    `auth=False` lets every request in as an admin (only for tests of the wire format);
    `rate`/`burst`: the token bucket per key (`rate=0`: no limit); `worker`: run a background-job
    worker thread while the app runs.
    """
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.responses import JSONResponse, StreamingResponse

    from tunelab.server import auth as keys
    from tunelab.server.logs import LogWriter

    app = FastAPI(title="tunelab gateway", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.workspace = workspace
    app.state.auth = auth
    app.state.limiter = keys.RateLimiter(rate, burst)
    log_call = LogWriter(workspace).write
    deployments: dict[str, Deployment] = {}
    deploy_lock = threading.Lock()

    def deployment(name: str) -> Deployment:
        with deploy_lock:
            if name not in deployments:
                try:
                    deployments[name] = resolve_deployment(workspace, name)
                except NotFound as exc:
                    raise HTTPException(404, detail={"message": str(exc), "type": "not_found"}) from None
                except UserError as exc:
                    raise HTTPException(400, detail={"message": str(exc), "type": "invalid_request"}) from None
            return deployments[name]

    app.state.forget_deployments = deployments.clear  # after a deploy, labels point elsewhere

    @app.exception_handler(HTTPException)
    async def _openai_errors(request, exc: HTTPException):
        if exc.status_code == 401 and request.url.path.startswith("/ui") and request.method == "GET":
            from fastapi.responses import RedirectResponse

            return RedirectResponse("/login", status_code=303)
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)

    viewer = require("viewer")
    app.state.require = require

    @app.get("/v1/models")
    def list_models(key: keys.KeyInfo = Depends(viewer)):
        names = _deployment_names(workspace)
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "tunelab"} for n in names]}

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatRequest, key: keys.KeyInfo = Depends(viewer)):
        dep = deployment(body.model)
        params: dict[str, Any] = {}
        if body.temperature is not None:
            params["temperature"] = body.temperature
        if body.max_tokens is not None:
            params["max_tokens"] = body.max_tokens
        if body.seed is not None:
            params["seed"] = body.seed
        if body.stop:
            params["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        variables = dict(body.tunelab_variables or {})
        record = {"key_name": key.name, "deployment": body.model, "kind": dep.kind, "prompt_version": dep.version,
                  "messages": messages, "variables": _jsonable(variables), "meta": {"params": params,
                                                                                   "stream": body.stream}}
        started = time.perf_counter()
        try:
            comp = dep.answer(messages, variables, params)
        except UserError as exc:
            log_call(**record, status="error", error=str(exc), latency_s=time.perf_counter() - started)
            raise HTTPException(400, detail={"message": str(exc), "type": "invalid_request"}) from None
        except Exception as exc:  # a model that fails is logged and answered as a 500, never silently
            log_call(**record, status="error", error=f"{type(exc).__name__}: {exc}",
                     latency_s=time.perf_counter() - started)
            raise HTTPException(500, detail={"message": "the deployment failed to answer", "type": "server_error"}) from None
        from tunelab.evaluate import request_cost

        cost = request_cost(dep.pricing, comp) if dep.pricing is not None else 0.0
        log_call(**record, output=comp.text, prompt_tokens=comp.prompt_tokens,
                 completion_tokens=comp.completion_tokens, latency_s=comp.latency_s or (time.perf_counter() - started),
                 cost=cost, status="ok")
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
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": comp.text},
                         "finish_reason": "stop"}],
            "usage": usage,
            "tunelab": {"latency_s": comp.latency_s, "label_logprobs": comp.label_logprobs,
                        "prompt_version": dep.version},
        }

    from tunelab.server.api import router as api_router

    app.include_router(api_router)
    if ui:
        from tunelab.server.ui import mount_ui

        mount_ui(app)
    if worker:
        from tunelab.server.jobs import Worker

        app.state.worker = Worker(workspace)

        @app.on_event("startup")
        def _start_worker():
            app.state.worker.start()

        @app.on_event("shutdown")
        def _stop_worker():
            app.state.worker.stop()

    app.add_middleware(SecurityHeaders)
    return app


class SecurityHeaders:
    """Pure ASGI middleware adding defensive headers to every HTTP response (cheaper than
    Starlette's BaseHTTPMiddleware)."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        framed = scope.get("path", "").startswith("/ui/comparisons/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = self.HEADERS + ([] if framed else [(b"x-frame-options", b"SAMEORIGIN")])
                headers.extend((k, v) for k, v in extra if k not in names)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def require(role: str):
    """A FastAPI dependency: the caller's key, which must have at least `role`.

    A key comes from `Authorization: Bearer tl-...`, or from the UI session cookie; a cookie
    request that changes something (any method but GET/HEAD) must carry the session's CSRF token
    (form field `csrf` or header `X-CSRF-Token`). Every accepted key takes a token from its bucket.
    """
    from fastapi import HTTPException
    from starlette.concurrency import run_in_threadpool

    from tunelab.server import auth as keys

    async def dependency(request: HttpRequest) -> keys.KeyInfo:
        app = request.app
        ws = app.state.workspace
        if not app.state.auth:
            return keys.KeyInfo(0, "anonymous", "admin")
        header = request.headers.get("authorization", "")
        key = None
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() == "bearer":
                key = await run_in_threadpool(keys.authenticate, ws, token.strip())
            if key is None:
                raise HTTPException(401, detail={"message": "invalid API key", "type": "invalid_api_key"},
                                    headers={"WWW-Authenticate": "Bearer"})
        else:
            found = await run_in_threadpool(keys.session_key, ws, request.cookies.get(SESSION_COOKIE))
            if found is None:
                raise HTTPException(401, detail={"message": "an API key is required (Authorization: Bearer KEY)",
                                                 "type": "invalid_api_key"}, headers={"WWW-Authenticate": "Bearer"})
            key, csrf = found
            request.state.csrf = csrf
            if request.method not in ("GET", "HEAD"):
                sent = request.headers.get("x-csrf-token")
                if sent is None:
                    sent = (await form_fields(request)).get("csrf")
                import hmac

                if not sent or not hmac.compare_digest(str(sent), csrf):
                    raise HTTPException(403, detail={"message": "missing or wrong CSRF token", "type": "csrf"})
        wait = app.state.limiter.take(f"{key.kind}:{key.name}")
        if wait > 0:
            import math

            raise HTTPException(429, detail={"message": f"rate limit for key '{key.name}'", "type": "rate_limit"},
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        if not key.can(role):
            raise HTTPException(403, detail={"message": f"this needs the {role} role (key '{key.name}' is "
                                                        f"{key.role})", "type": "forbidden"})
        request.state.key = key
        return key

    return dependency


SESSION_COOKIE = "tunelab_session"
MAX_FORM_BYTES = 2_000_000


async def form_fields(request: HttpRequest) -> dict[str, str]:
    """The fields of an `application/x-www-form-urlencoded` body (what HTML forms and HTMX send),
    parsed once per request; other bodies have no fields."""
    from urllib.parse import parse_qsl

    from fastapi import HTTPException

    cached = getattr(request.state, "form_fields", None)
    if cached is not None:
        return cached
    fields: dict[str, str] = {}
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, detail={"message": "form too large", "type": "invalid_request"})
        fields = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    request.state.form_fields = fields
    return fields


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str))


def _deployment_names(workspace) -> list[str]:
    names: list[str] = []
    try:
        from sqlalchemy import select

        from tunelab.store.models import FineTuneRow, PromptLabelRow

        with workspace.store.session() as s:
            for row in s.scalars(select(PromptLabelRow).order_by(PromptLabelRow.name, PromptLabelRow.label)):
                names.append(f"{row.name}@{row.label}")
            for ft in s.scalars(select(FineTuneRow).where(FineTuneRow.status == "done").order_by(FineTuneRow.name)):
                names.append(f"ft:{ft.name}")
    except Exception:  # an unreadable store lists no deployments rather than failing /v1/models
        pass
    if workspace.prompts_dir.is_dir():
        names.extend(sorted(p.stem for p in workspace.prompts_dir.glob("*.prompt")))
    names.append(workspace.config.default_model)
    return names


def serve(workspace, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", *,
          worker: bool = True, rate: float = 20.0, burst: int = 200) -> None:
    import uvicorn

    uvicorn.run(create_app(workspace, worker=worker, rate=rate, burst=burst), host=host, port=port,
                log_level=log_level)
