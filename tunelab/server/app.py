"""The gateway: OpenAI-compatible `/v1/chat/completions` and `/v1/models`.

`model` names a deployment:

    support-router@production   a prompt at a label (or a version), on the prompt's model
    support-router              the prompt's working file
    ft:NAME                     a fine-tuned model (raw chat)
    hybrid:NAME                 a hybrid router
    smollm2-135m | fake | ...   any model spec `load_model` accepts (raw chat)

For a prompt deployment the template variables come from the extension field
`tunelab_variables` (an object), or else the last user message becomes `input`.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from tunelab.errors import NotFound, UserError
from tunelab.models.base import Completion, Request


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


def resolve_deployment(workspace, name: str) -> Deployment:
    """The deployment called `name` (see the module doc)."""
    from tunelab.models import load_model

    if name.startswith("hybrid:"):
        from tunelab.datasets import Example
        from tunelab.router import load_router

        router = load_router(workspace, name[len("hybrid:"):])

        def answer_hybrid(messages, variables, params):
            example = Example(input=variables.get("input", _last_user(messages)), output="", meta=variables)
            return router.predict([example], 0)[0]

        return Deployment(name, "hybrid", answer_hybrid)

    prompt_name = name.split("@", 1)[0]
    if ("@" in name or (workspace.prompts_dir / f"{prompt_name}.prompt").is_file()) and not name.startswith("ft:"):
        from tunelab.datasets import Example
        from tunelab.prompts import load_prompt

        prompt = load_prompt(workspace, name)
        model = load_model(prompt.model or workspace.config.default_model, workspace)
        demos = prompt.resolve_demos(workspace)
        lock = _model_lock(model)

        def answer_prompt(messages, variables, params):
            fields = dict(variables)
            inp = fields.pop("input", None)
            example = Example(input=inp if inp is not None else _last_user(messages), output="", meta=fields)
            request = prompt.request(example, demos, **params)
            with lock:
                return model.complete([request])[0]

        return Deployment(name, "prompt", answer_prompt)

    model = load_model(name, workspace)
    lock = _model_lock(model)

    def answer_model(messages, variables, params):
        request = Request(messages=messages, **params)
        with lock:
            return model.complete([request])[0]

    return Deployment(name, "model", answer_model)


_locks: dict[int, threading.Lock] = {}


def _model_lock(model) -> threading.Lock:
    """Local models run one batch at a time; remote ones take concurrent calls."""
    if getattr(model, "backend", "") in {"openai", "fake"}:
        return _NoLock()
    return _locks.setdefault(id(model), threading.Lock())


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _last_user(messages: list[dict]) -> str:
    return next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")


def create_app(workspace):
    """The FastAPI app serving `workspace`'s deployments."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="tunelab gateway", version="0.1.0")
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

    @app.exception_handler(HTTPException)
    async def _openai_errors(_request, exc: HTTPException):
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        return JSONResponse({"error": detail}, status_code=exc.status_code)

    @app.get("/v1/models")
    def list_models():
        names = _deployment_names(workspace)
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "tunelab"} for n in names]}

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatRequest):
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
        try:
            comp = dep.answer(messages, dict(body.tunelab_variables or {}), params)
        except UserError as exc:
            raise HTTPException(400, detail={"message": str(exc), "type": "invalid_request"}) from None
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
            "tunelab": {"latency_s": comp.latency_s, "label_logprobs": comp.label_logprobs},
        }

    return app


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


def serve(workspace, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(create_app(workspace), host=host, port=port, log_level=log_level)
