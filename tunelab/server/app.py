"""The team server (`tunelab serve`): one FastAPI app over one workspace.

    app = create_app(ws)          # the gateway, the JSON API and the web UI; uvicorn serves it

- `tunelab.server.gateway`: OpenAI-compatible `/v1/chat/completions` and `/v1/models`; a
  deployment is a candidate, answered exactly as it was measured, micro-batched per model.
- `tunelab.server.api`: the JSON API (prompts, logs, jobs).
- `tunelab.server.ui`: the web console (edit, test, version and deploy prompts; runs, comparisons,
  fine-tunes, jobs, logs, keys).
- `tunelab.server.auth`: API keys, users, UI sessions, roles and rate limits: every endpoint needs
  a key (`Authorization: Bearer tl-...`) or a UI session, and a role; `create_app(ws, auth=False)`
  opts out (tests of the OpenAI wire format only). Each key is rate-limited (429 with Retry-After).
- `tunelab.server.logs`: every gateway call logged (group-committed: a call returns once its row
  is written); `tunelab.server.jobs`: background jobs and the worker.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, RedirectResponse

from tunelab.server.api import router as api_router
from tunelab.server.auth import RateLimiter
from tunelab.server.gateway import Deployments
from tunelab.server.gateway import router as gateway_router
from tunelab.server.jobs import Worker
from tunelab.server.logs import LogWriter
from tunelab.server.ui import mount_ui

if TYPE_CHECKING:
    from tunelab.workspace import Workspace


def create_app(workspace: "Workspace", *, auth: bool = True, rate: float = 20.0, burst: int = 200, ui: bool = True,
               worker: bool = False) -> FastAPI:
    """The FastAPI app serving `workspace`: the gateway, the JSON API and the web UI.

    `auth=False` lets every request in as an admin (only for tests of the wire format);
    `rate`/`burst`: the token bucket per key (`rate=0`: no limit); `worker`: run a background-job
    worker thread while the app runs. While the app lives, `app.state.deployments` holds the
    resolved deployments and their micro-batchers (`forget()` after a deploy).
    """
    deployments = Deployments(workspace)
    job_worker = Worker(workspace) if worker else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if job_worker is not None:
            job_worker.start()
        try:
            yield
        finally:
            if job_worker is not None:
                job_worker.stop()
            deployments.forget()  # stops the batchers' threads

    app = FastAPI(title="tunelab gateway", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.workspace = workspace
    app.state.auth = auth
    app.state.limiter = RateLimiter(rate, burst)
    app.state.log_call = LogWriter(workspace).write
    app.state.deployments = deployments
    app.state.worker = job_worker

    @app.exception_handler(HTTPException)
    async def _openai_errors(request, exc: HTTPException):
        if exc.status_code == 401 and request.url.path.startswith("/ui") and request.method == "GET":
            return RedirectResponse("/login", status_code=303)
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)

    app.include_router(gateway_router)
    app.include_router(api_router)
    if ui:
        mount_ui(app)
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


def serve(workspace: "Workspace", host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", *,
          worker: bool = True, rate: float = 20.0, burst: int = 200) -> None:
    import uvicorn

    uvicorn.run(create_app(workspace, worker=worker, rate=rate, burst=burst), host=host, port=port,
                log_level=log_level)
