"""Models: load a backend by its spec string.

    smollm2-135m            the bundled SmolLM2-135M-Instruct (local backend; also `smollm2`)
    local:PATH | PATH       any local Hugging Face model folder
    fake | fake:NAME        the fake model for tests
    ft:NAME                 a fine-tuned model of this workspace
    openai:MODEL            an OpenAI-compatible server (base URL from tunelab.yaml or env)
    NAME                    a model named under `models:` in tunelab.yaml
    BACKEND:REST            any backend registered under the `tunelab.models` entry point group

Backends are classes registered through entry points, built-in ones exactly like a plugin's.
A backend class is constructed as `cls(name=..., **settings)` where settings are the fields of
`ModelConfig` that are set (path, base_url, model, api_key_env, precision, concurrency, ...).
"""

from __future__ import annotations

import inspect
import os
import threading
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import NotFound, UserError
from tunelab.models.base import Completion, Message, Model, Request, match_label

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

__all__ = ["Completion", "Message", "Model", "Request", "load_model", "backend_class", "match_label",
           "BUNDLED_ALIASES"]

BUNDLED_ALIASES = {"smollm2-135m", "smollm2", "smollm2-135m-instruct"}

_loaded: dict[tuple, Model] = {}
_lock = threading.Lock()


def backend_class(backend: str) -> type[Model]:
    """The class registered for `backend` under the `tunelab.models` entry point group."""
    for ep in entry_points(group="tunelab.models"):
        if ep.name == backend:
            return ep.load()
    known = sorted(ep.name for ep in entry_points(group="tunelab.models"))
    raise NotFound(f"unknown model backend '{backend}' (known: {', '.join(known)})")


def load_model(spec: str, workspace: "Workspace | None" = None, *, cached: bool = True, **options: Any) -> Model:
    """The model for `spec` (see the module doc). Loaded models are kept for the process."""
    key = (spec, str(workspace.root) if workspace else None, tuple(sorted(options.items())))
    if cached:
        with _lock:
            if key in _loaded:
                return _loaded[key]
    model = _build(spec, workspace, **options)
    if cached:
        with _lock:
            _loaded.setdefault(key, model)
            model = _loaded[key]
    return model


def clear_loaded() -> None:
    with _lock:
        _loaded.clear()


def _build(spec: str, workspace: "Workspace | None", **options: Any) -> Model:
    spec = (spec or "").strip()
    if not spec:
        raise UserError("no model given")
    if spec.lower() in BUNDLED_ALIASES:
        return backend_class("local")(name="smollm2-135m", **options)
    if workspace is not None and spec in workspace.config.models:
        cfg = workspace.config.models[spec]
        settings = cfg.model_dump(exclude_none=True, exclude={"backend", "pricing"})
        settings.update(options)
        cls = backend_class(cfg.backend)
        if "workspace" in inspect.signature(cls).parameters:
            settings = {"workspace": workspace, **settings}
        return cls(name=spec, **settings)
    if spec.startswith("ft:"):
        from tunelab import finetune

        if workspace is None:
            raise UserError(f"model '{spec}' needs a workspace")
        return finetune.load_finetuned(workspace, spec[3:], **options)
    if spec == "fake":
        return backend_class("fake")(name="fake", **options)
    if ":" in spec and not Path(spec).exists():
        backend, rest = spec.split(":", 1)
        if backend == "local":
            return backend_class("local")(name=rest, path=rest, **options)
        if backend == "openai":
            settings = {"model": rest}
            settings.update(options)
            return backend_class("openai")(name=spec, **settings)
        cls = backend_class(backend)
        if workspace is not None and "workspace" in inspect.signature(cls).parameters:
            options = {"workspace": workspace, **options}  # e.g. llamacpp:ft:NAME finds its fine-tune there
        return cls(name=rest if backend == "fake" else spec, **options)
    if Path(spec).is_dir():
        return backend_class("local")(name=os.path.basename(os.path.normpath(spec)), path=spec, **options)
    hint = ""
    if workspace is not None and workspace.config.models:
        hint = f"; models in tunelab.yaml: {', '.join(sorted(workspace.config.models))}"
    raise NotFound(f"unknown model '{spec}' (try smollm2-135m, a model folder, ft:NAME, openai:MODEL{hint})")
