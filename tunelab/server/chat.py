"""The OpenAI chat-completions wire format, read strictly: what a request asks for, checked before
any compute, and the parts of a response. Every refusal is an `ApiError`, sent in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`.

    req = parse_chat(body_bytes)              # ApiError(400) for bad JSON, a bad field, an unknown role
    messages = chat_messages(req)             # [{"role", "content"}] (content parts joined; tools refused)

What a request may ask, and what happens:

- `n` (1-16): n choices; choice i is the answer with seed (repeat index) `seed + i`.
- `max_tokens` / `max_completion_tokens`, `temperature`, `stop`: settings (see
  `tunelab.server.deployments`: a candidate applies only those its label allows).
- `seed`: the repeat index of the candidate's seeded draw (none: 0).
- `response_format`: `text`; `json_object` or `json_schema` on a candidate whose prompt's output is
  JSON (its own schema must be the requested one: the candidate decides), or on a raw model whose
  backend constrains decoding (`Model.constrains_json`); otherwise a 400.
- `logprobs` / `top_logprobs`: a label output's label log-probabilities (the label scores, over the
  labels); free text has none (null, and `logprobs` is listed as ignored).
- `tools`, `functions`, tool messages and assistant tool calls: a 400 (no deployment calls tools).
- content as a list of parts: text parts are joined with newlines; image, audio or file parts: 400.
- `top_p`, penalties, `logit_bias`, `user`, `metadata` and unknown fields are not applied and are
  listed in `tunelab.ignored`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunelab.models.base import Completion


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = "response"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=300)
    messages: list[Message] = Field(min_length=1, max_length=2000)
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    top_p: float | None = Field(None, ge=0, le=1)
    tunelab_variables: dict[str, Any] | None = None


NOT_APPLIED = {"top_p": 1, "presence_penalty": 0, "frequency_penalty": 0}  # ignored unless set to these
KNOWN_INERT = {"parallel_tool_calls", "user", "metadata", "store", "service_tier", "logit_bias", "stream_options"}


def parse_chat(raw: bytes) -> ChatRequest:
    """The request in `raw` (JSON), validated; an ApiError(400) names the field otherwise."""
    try:
        data = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object with 'model' and 'messages'")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(x) for x in err["loc"] if str(x) not in ("str", "int", "float", "bool", "none")
               and not str(x).startswith(("function-", "literal[", "list[", "dict["))]
        param = ".".join(loc) or None
        if loc[:1] == ["messages"] and len(loc) >= 3 and loc[2] == "role":
            message = (f"'{err.get('input')}' is not a valid role for messages[{loc[1]}]: expected system, developer, "
                       "user or assistant")
        else:
            message = f"{param or 'body'}: {err['msg']}"
        raise ApiError(400, message, param=param) from None


def refuse_unsupported(req: ChatRequest) -> None:
    """A 400 for what no deployment does (tools), and for inconsistent options."""
    if req.tools or req.functions or (req.tool_choice not in (None, "none")) or req.function_call not in (None, "none"):
        which = "tools" if req.tools or req.tool_choice not in (None, "none") else "functions"
        raise ApiError(400, f"{which} (function calling) are not supported by this deployment: it answers the "
                       "request itself and never calls a tool", param=which, code="unsupported_parameter")
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if req.response_format and req.response_format.type == "json_schema" and req.response_format.json_schema is None:
        raise ApiError(400, "response_format json_schema needs a 'json_schema' object with the schema",
                       param="response_format.json_schema")


def chat_messages(req: ChatRequest) -> list[dict[str, str]]:
    """The messages as {role, content} text: `developer` is a system message, text parts are
    joined; anything but text is a 400."""
    out = []
    for i, m in enumerate(req.messages):
        if m.role in ("tool", "function") or m.tool_calls:
            raise ApiError(400, f"messages[{i}]: tool calls and tool results are not supported by this deployment "
                           "(it never calls tools)", param=f"messages.{i}", code="unsupported_parameter")
        content = m.content
        if content is None:
            if m.role != "assistant":
                raise ApiError(400, f"messages[{i}].content is null: only an assistant turn may have no content",
                               param=f"messages.{i}.content")
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type")
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content[{j}]: only text parts are supported by this "
                                   f"deployment (got type '{kind}')", param=f"messages.{i}.content.{j}",
                                   code="unsupported_content")
                texts.append(part["text"])
            content = "\n".join(texts)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def asked_settings(req: ChatRequest) -> dict[str, Any]:
    """The settings the request asks for, under the model request's names (max_tokens, ...)."""
    asked: dict[str, Any] = {}
    if req.temperature is not None:
        asked["temperature"] = req.temperature
    tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if tokens is not None:
        asked["max_tokens"] = tokens
    if req.stop:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop)
        if len(stops) > 4 or any(not s or len(s) > 200 for s in stops):
            raise ApiError(400, "stop: at most 4 non-empty strings of at most 200 characters", param="stop")
        asked["stop"] = stops
    return asked


def setting_names(names: list[str], req: ChatRequest) -> list[str]:
    """The names the client used ("max_completion_tokens" where it sent that)."""
    return [("max_completion_tokens" if n == "max_tokens" and req.max_completion_tokens is not None else n)
            for n in names]


def inert_fields(req: ChatRequest) -> list[str]:
    """Fields of the request that no deployment applies (listed as ignored)."""
    extra = dict(req.model_extra or {})
    names = [k for k, default in NOT_APPLIED.items()
             if (getattr(req, k, None) if k in ChatRequest.model_fields else extra.get(k)) not in (None, default)]
    names += sorted(k for k in extra if k not in NOT_APPLIED and k not in KNOWN_INERT)
    names += sorted(k for k in extra if k in KNOWN_INERT and k != "stream_options" and extra[k] not in (None, False))
    return names


def comparable_schema(schema: Any) -> Any:
    """A JSON schema without the keys that do not constrain a value (title, description, ...)."""
    if isinstance(schema, dict):
        return {k: comparable_schema(v) for k, v in schema.items()
                if k not in ("title", "description", "$schema", "examples", "default", "strict")}
    if isinstance(schema, list):
        return [comparable_schema(v) for v in schema]
    return schema


def label_logprobs(comp: Completion, top: int) -> dict[str, Any] | None:
    """OpenAI's `logprobs` for a label answer: the chosen label as one token, with the best `top`
    labels as alternatives (log-probabilities over the labels)."""
    scores = comp.label_logprobs
    if not scores or comp.text not in scores:
        return None

    def entry(label: str) -> dict[str, Any]:
        return {"token": label, "logprob": scores[label], "bytes": list(label.encode("utf-8"))}

    best = sorted(scores, key=lambda k: -scores[k])[:top]
    return {"content": [{**entry(comp.text), "top_logprobs": [entry(k) for k in best]}], "refusal": None}


def usage(comps: list[Completion]) -> dict[str, int]:
    prompt = comps[0].prompt_tokens if comps else 0  # the same prompt for every choice
    completion = sum(c.completion_tokens for c in comps)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
