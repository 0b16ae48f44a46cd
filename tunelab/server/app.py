"""The team server (`tunelab serve`): one FastAPI app over one workspace.

    app = create_app(ws)          # the gateway, the JSON API and the web UI; uvicorn serves it

- `tunelab.server.gateway`: OpenAI-compatible `/v1/chat/completions` and `/v1/models`; a
  deployment is a candidate (`tunelab.server.deployments`), answered exactly as it was measured,
  micro-batched per model; the wire format is read by `tunelab.server.chat`.
- `tunelab.server.api`: the JSON API (prompts, logs, jobs).
- `tunelab.server.ui`: the web console (edit, test, version and deploy prompts; runs, comparisons,
  fine-tunes, jobs, logs, keys).
- `tunelab.server.auth`: API keys, users, UI sessions, roles and rate limits: every endpoint needs
  a key (`Authorization: Bearer tl-...`) or a UI session, and a role; `create_app(ws, auth=False)`
  opts out (tests of the OpenAI wire format only). Each key is rate-limited (429 with Retry-After).

Every response carries the usual security headers and a Content-Security-Policy (scripts and
styles from /static only); a request body over `max_body` bytes is refused with 413 before it is
read. Errors are JSON in OpenAI's shape, except for a browser asking for a page, which gets a page
that says what happened and where to go.
- `tunelab.lifecycle.calls`: every gateway call logged (group-committed: a call returns once its row
  is written); `tunelab.server.rollout`: canaries and shadows (the shadow queue answers in the
  background); `tunelab.server.jobs`: background jobs and the worker.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.server.api import router as api_router
from tunelab.server.auth import RateLimiter
from tunelab.server.chat import ApiError
from tunelab.server.deployments import Deployments
from tunelab.server.gateway import router as gateway_router
from tunelab.server.jobs import Worker
from tunelab.lifecycle.calls import LogWriter, write_shadow_answers
from tunelab.server.rollout import SHADOW_CAPACITY, Rollouts, ShadowQueue
from tunelab.server.ui import error_page, mount_ui

MAX_BODY = 1_000_000  # bytes of a request body (413 above)

if TYPE_CHECKING:
    from tunelab.workspace import Workspace


def create_app(workspace: "Workspace", *, auth: bool = True, rate: float = 20.0, burst: int = 200, ui: bool = True,
               worker: bool = False, max_body: int = MAX_BODY, shadow_capacity: int = SHADOW_CAPACITY,
               shadow_worker: str = "auto") -> FastAPI:
    """The FastAPI app serving `workspace`: the gateway, the JSON API and the web UI.

    `auth=False` lets every request in as an admin (only for tests of the wire format);
    `rate`/`burst`: the token bucket per key (`rate=0`: no limit); `max_body`: the largest request
    body in bytes (413 above); `worker`: run a background-job
    worker thread while the app runs; `shadow_capacity`: shadow answers waiting at most (more are
    dropped and logged as dropped); `shadow_worker`: where shadows answer ("auto": a local model's
    in a worker process of its own, the others in a thread; "process"; "thread"). While the app lives, `app.state.deployments` holds the
    resolved deployments and their micro-batchers (`forget()` after a deploy), `app.state.rollouts`
    their canaries and shadows, `app.state.shadows` the shadow queue.
    """
    deployments = Deployments(workspace)
    job_worker = Worker(workspace) if worker else None
    writer = LogWriter(workspace)
    shadows = ShadowQueue(deployments, lambda answers: write_shadow_answers(workspace, answers),
                          capacity=shadow_capacity, worker=shadow_worker)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if job_worker is not None:
            job_worker.start()
        try:
            yield
        finally:
            if job_worker is not None:
                job_worker.stop()
            shadows.close()  # what it did not answer is logged as dropped
            deployments.forget()  # stops the batchers' threads

    app = FastAPI(title="tunelab gateway", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.workspace = workspace
    app.state.auth = auth
    app.state.limiter = RateLimiter(rate, burst)
    app.state.log_call = writer.write
    app.state.deployments = deployments
    app.state.rollouts = Rollouts(workspace, deployments)
    app.state.shadows = shadows
    app.state.worker = job_worker

    def answer(request, status: int, error: dict, headers=None):
        if status == 401 and request.url.path.startswith("/ui") and request.method == "GET":
            return RedirectResponse("/login", status_code=303)
        error = {"message": str(error.get("message", "")), "type": error.get("type", "invalid_request_error"),
                 "param": error.get("param"), "code": error.get("code")}
        if ui and wants_page(request):
            return error_page(request, status, error["message"], headers=headers)
        return JSONResponse({"error": error}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_errors(request, exc: ApiError):
        return answer(request, exc.status, exc.body()["error"])

    @app.exception_handler(StarletteHTTPException)
    async def _http_errors(request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail),
                                                                  "type": _TYPES.get(exc.status_code, "invalid_request_error")}
        return answer(request, exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path")) or None
        return answer(request, 400, {"message": f"{param or 'request'}: {err.get('msg')}", "param": param})

    app.include_router(gateway_router)
    app.include_router(api_router)
    if ui:
        mount_ui(app)
    app.add_middleware(BodyLimit, max_body=max_body)
    app.add_middleware(SecurityHeaders)
    return app


_TYPES = {401: "invalid_request_error", 403: "permission_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def wants_page(request) -> bool:
    """A browser navigating to a page (not the API, not an HTMX fragment)."""
    path = request.url.path
    return (not path.startswith(("/v1/", "/api/")) and "text/html" in request.headers.get("accept", "")
            and not request.headers.get("hx-request"))


class BodyLimit:
    """Pure ASGI middleware: a request body over `max_body` bytes is answered 413 (by its
    Content-Length before anything is read, else as soon as the bytes received pass the limit)."""

    def __init__(self, app, max_body: int = MAX_BODY):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._refuse(send)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        body = ('{"error": {"message": "the request body is larger than %d bytes", "type": '
                '"invalid_request_error", "param": null, "code": "request_too_large"}}' % self.max_body).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'self'")


class SecurityHeaders:
    """Pure ASGI middleware adding defensive headers to every HTTP response (cheaper than
    Starlette's BaseHTTPMiddleware): a Content-Security-Policy (scripts only from /static: no
    inline script runs; CodeMirror sets inline styles), no sniffing, no referrer, no framing by
    other sites, no browser features, and UI pages never cached (Back shows a fresh page)."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
               (b"content-security-policy", CSP.encode()), (b"cross-origin-opener-policy", b"same-origin"),
               (b"cross-origin-resource-policy", b"same-origin"),
               (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=()")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        framed = path.startswith("/ui/comparisons/") and path.endswith("/report")
        page = path.startswith("/ui") or path in ("/", "/login")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = self.HEADERS + ([] if framed else [(b"x-frame-options", b"SAMEORIGIN")])
                if page:
                    extra = extra + [(b"cache-control", b"no-store")]
                headers.extend((k, v) for k, v in extra if k not in names)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def serve(workspace: "Workspace", host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", *,
          worker: bool = True, rate: float = 20.0, burst: int = 200, max_body: int = MAX_BODY,
          shadow_capacity: int = SHADOW_CAPACITY, shadow_worker: str = "auto") -> None:
    import uvicorn

    uvicorn.run(create_app(workspace, worker=worker, rate=rate, burst=burst, max_body=max_body,
                           shadow_capacity=shadow_capacity, shadow_worker=shadow_worker),
                host=host, port=port, log_level=log_level)
