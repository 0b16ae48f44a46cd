"""The `openai` backend: any OpenAI-compatible server (vLLM, Ollama, llama.cpp's server, hosted APIs).

    models:
      big:
        backend: openai
        base_url: http://127.0.0.1:8000/v1
        model: Qwen2.5-7B-Instruct
        api_key_env: OPENAI_API_KEY      # the variable's name; the key never goes in a file
        concurrency: 16
        timeout_s: 60

Or on the command line: `--model openai:MODEL` with `TUNELAB_OPENAI_BASE_URL` (or
`OPENAI_BASE_URL`) set. Requests go out concurrently (at most `concurrency` in flight), are
retried with exponential backoff and jitter on 429, 5xx, timeouts and connection errors
(honouring Retry-After), and token usage is read from the server's response.

Label requests are answered by generating and matching the answer to a label (`match_label`);
the raw answer is kept as `free_text`, so format compliance is measured the same way as locally.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from typing import Any

from tunelab.errors import UserError
from tunelab.models.base import Completion, Model, Request, match_label

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class BackendError(UserError):
    """The server could not answer (unreachable, timing out, or refusing the request)."""


class OpenAIModel(Model):
    backend = "openai"

    def __init__(self, name: str = "openai", model: str | None = None, base_url: str | None = None,
                 api_key_env: str | None = None, concurrency: int | None = None, timeout_s: float | None = None,
                 max_retries: int = 4, backoff_s: float = 0.5, structured_output: bool = False, **_: Any):
        self.name = name
        self.model = model or name
        base_url = base_url or os.environ.get("TUNELAB_OPENAI_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise UserError(f"model '{name}': no server URL; set base_url in tunelab.yaml or TUNELAB_OPENAI_BASE_URL")
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.concurrency = concurrency or 8
        self.timeout_s = timeout_s or 60.0
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.structured_output = structured_output
        # a server asked for structured output (response_format json_schema) decodes under the schema
        self.constrains_json = bool(structured_output)  # type: ignore[misc]

    @property
    def fingerprint(self) -> str:
        return f"openai:{self.base_url}:{self.model}"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        env = self.api_key_env or ("OPENAI_API_KEY" if os.environ.get("OPENAI_API_KEY") else None)
        if env:
            key = os.environ.get(env)
            if not key:
                raise UserError(f"model '{self.name}': environment variable {env} (the API key) is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    # -- the one method --------------------------------------------------------------------------
    def complete(self, requests: list[Request]) -> list[Completion]:
        if not requests:
            return []
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.acomplete(requests))
        # Called from inside an event loop (e.g. a server handler): run in a thread of our own.
        result: list[Completion] = []
        error: list[BaseException] = []

        def target() -> None:
            try:
                result.extend(asyncio.run(self.acomplete(requests)))
            except BaseException as exc:  # re-raised in the caller's thread
                error.append(exc)

        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return result

    async def acomplete(self, requests: list[Request]) -> list[Completion]:
        import httpx

        limit = asyncio.Semaphore(self.concurrency)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), limits=limits,
                                     headers=self._headers()) as client:
            async def one(req: Request) -> Completion:
                async with limit:
                    return await self._one(client, req)

            return list(await asyncio.gather(*(one(r) for r in requests)))

    def _body(self, req: Request) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": req.messages, "temperature": req.temperature,
                                "max_tokens": max(req.max_tokens, 16) if req.labels else req.max_tokens}
        if req.seed is not None:
            body["seed"] = req.seed
        if req.stop:
            body["stop"] = req.stop
        if req.json_schema is not None and self.structured_output:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": req.json_schema}}
        return body

    async def _one(self, client, req: Request) -> Completion:
        import httpx

        url = f"{self.base_url}/chat/completions"
        body = self._body(req)
        start = time.perf_counter()
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                resp = await client.post(url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}"
            else:
                if resp.status_code == 200:
                    return self._parse(req, resp.json(), time.perf_counter() - start)
                if resp.status_code not in RETRY_STATUS:
                    raise BackendError(f"{url} answered {resp.status_code}: {_error_text(resp)}")
                last = f"HTTP {resp.status_code}"
                retry_after = _retry_after(resp.headers.get("retry-after"))
            if attempt < self.max_retries:
                delay = self.backoff_s * (2 ** attempt)
                delay = delay / 2 + random.uniform(0, delay / 2)  # jitter
                if retry_after is not None:
                    delay = max(delay, min(retry_after, 30.0))
                await asyncio.sleep(delay)
        raise BackendError(f"{url} failed after {self.max_retries + 1} attempts ({last}); "
                           f"is the server running? finished work is kept")

    def _parse(self, req: Request, data: dict[str, Any], latency: float) -> Completion:
        try:
            text = data["choices"][0]["message"].get("content") or ""
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"{self.base_url}: response has no choices[0].message") from None
        usage = data.get("usage") or {}
        prompt_tokens = usage.get("prompt_tokens")
        if prompt_tokens is None:
            prompt_tokens = sum(self.count_tokens(m["content"]) for m in req.messages)
        completion_tokens = usage.get("completion_tokens")
        if completion_tokens is None:
            completion_tokens = self.count_tokens(text)
        comp = Completion(text=text.strip(), prompt_tokens=int(prompt_tokens),
                          completion_tokens=int(completion_tokens), latency_s=latency,
                          meta={"finish_reason": data["choices"][0].get("finish_reason")})
        if req.labels:
            chosen = match_label(text, req.labels)
            comp.free_text = text.strip()
            comp.meta["valid_label"] = chosen is not None
            comp.text = chosen if chosen is not None else text.strip()
        return comp


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _error_text(resp) -> str:
    try:
        data = resp.json()
        if isinstance(data, dict):
            err = data.get("error", data.get("detail", data))
            if isinstance(err, dict):
                return str(err.get("message", err))
            return str(err)
    except ValueError:
        pass
    return resp.text[:200]
