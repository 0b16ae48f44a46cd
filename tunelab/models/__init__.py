"""Models: load a backend by its spec string.

    smollm2-135m            the bundled SmolLM2-135M-Instruct (local backend; also `smollm2`)
    gemma3-270m             the bundled Gemma 3 270M, pretrained (local backend; plain-text prompts)
    local:PATH | PATH       any local Hugging Face model folder
    fake | fake:NAME        the fake model for tests
    ft:NAME                 a fine-tuned model of this workspace (its model folder, `tunelab.models.finetuned`)
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
from typing import TYPE_CHECKING, Any, Callable

from tunelab.errors import NotFound, UserError
from tunelab.models.base import Completion, Message, Model, Request, match_label
from tunelab.models.finetuned import read_finetuned
from tunelab.models.local.head import HeadModel, has_head
from tunelab.models.weights import BUNDLED_ALIASES, bundled, folder_template

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

__all__ = ["Completion", "Message", "Model", "Request", "load_model", "backend_class", "match_label",
           "BUNDLED_ALIASES", "template_of"]


_loaded: dict[tuple, Model] = {}
_lock = threading.Lock()
_on_free: list[Callable[[], None]] = []  # what other layers hold besides `_loaded` (demos' embedding model)


def on_free_weights(release: Callable[[], None]) -> Callable[[], None]:
    """Register `release()`: `free_weights` calls it, for weights held outside the load cache."""
    if release not in _on_free:
        _on_free.append(release)
    return release


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


def release_memory() -> None:
    """Drop the loaded models (they load again on their next use, from the safetensors cache in
    about a second) and hand freed memory back to the system (glibc's `malloc_trim`): the flow calls
    it between steps, so a fine-tune does not train beside the evaluator's models."""
    free_weights()
    clear_loaded()


def free_weights() -> None:
    """Drop the weights of every loaded model (each loads them again on its next use, from the
    safetensors cache in about a second) but keep the model objects, their settings and state, drop
    what `on_free_weights` registered (the sentence-embedding model), and hand freed memory back to
    the system: `compare` calls it between candidates."""
    import gc

    for model in list(_loaded.values()):
        close = getattr(model, "close", None)
        if close is not None:
            close()
    for release in _on_free:
        release()
    gc.collect()
    trim_malloc()


def trim_malloc() -> None:
    """Return the C heap's free pages to the system where glibc is the allocator (no-op elsewhere)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _build(spec: str, workspace: "Workspace | None", name: str | None = None, **options: Any) -> Model:
    spec = (spec or "").strip()
    if not spec:
        raise UserError("no model given")
    if spec.lower() in BUNDLED_ALIASES:
        base = bundled(spec)
        return backend_class("local")(name=name or base.name, path=base.name, **options)
    if workspace is not None and spec in workspace.config.models:
        cfg = workspace.config.models[spec]
        settings = cfg.model_dump(exclude_none=True, exclude={"backend", "pricing"})
        settings.update(options)
        cls = backend_class(cfg.backend)
        if "workspace" in inspect.signature(cls).parameters:
            settings = {"workspace": workspace, **settings}
        return cls(name=name or spec, **settings)
    if spec.startswith("ft:"):
        return _finetuned("local", spec, workspace, **options)
    if spec == "fake":
        return backend_class("fake")(name=name or "fake", **options)
    if ":" in spec and not Path(spec).exists():
        backend, rest = spec.split(":", 1)
        if backend == "local":
            return backend_class("local")(name=name or rest, path=rest, **options)
        if backend == "openai":
            settings = {"model": rest}
            settings.update(options)
            return backend_class("openai")(name=name or spec, **settings)
        if rest.startswith("ft:"):  # e.g. llamacpp:ft:NAME: that backend over the fine-tune's files
            return _finetuned(backend, rest, workspace, name=spec, **options)
        cls = backend_class(backend)
        if workspace is not None and "workspace" in inspect.signature(cls).parameters:
            options = {"workspace": workspace, **options}
        return cls(name=name or (rest if backend == "fake" else spec), **options)
    if Path(spec).is_dir():
        return backend_class("local")(name=name or os.path.basename(os.path.normpath(spec)), path=spec, **options)
    hint = ""
    if workspace is not None and workspace.config.models:
        hint = f"; models in tunelab.yaml: {', '.join(sorted(workspace.config.models))}"
    raise NotFound(f"unknown model '{spec}' (try smollm2-135m, gemma3-270m, a model folder, ft:NAME, openai:MODEL{hint})")


def _finetuned(backend: str, spec: str, workspace: "Workspace | None", name: str | None = None,
               **options: Any) -> Model:
    """`ft:NAME` on `backend`: the base model with the fine-tune's adapter, or its trained weights'
    folder; the backend gets paths only. A LoRA over a base of another backend (a fake base in
    tests) is built by that base's spec."""
    if workspace is None:
        raise UserError(f"model '{spec}' needs a workspace")
    ft = read_finetuned(workspace, spec[3:])
    if has_head(ft.adapter):  # a classification-head fine-tune: the local backend with its head
        if backend != "local" or not (ft.base.lower() in BUNDLED_ALIASES or Path(ft.base).is_dir()):
            raise UserError(f"{spec} is a classification-head fine-tune: it runs on the local backend only "
                            f"(its base: {ft.base})")
        path = bundled(ft.base).name if ft.base.lower() in BUNDLED_ALIASES else ft.base
        return HeadModel(name=name or spec, path=path, adapter=str(ft.adapter), **options)
    if ft.adapter is None:
        return backend_class(backend)(name=name or spec, path=str(ft.weights), **options)
    if backend == "local":
        return _build(ft.base, workspace, name=name or spec, adapter=str(ft.adapter), **options)
    return backend_class(backend)(name=name or spec, path=ft.base, adapter=str(ft.adapter), **options)


def template_of(spec: str, workspace: "Workspace | None" = None) -> str:
    """How the model `spec` renders prompts, said without loading it: "chat template" (its own, e.g.
    SmolLM2), "plain text" (a base model without one, e.g. gemma3-270m: `tunelab.models.chat`), or
    what the backend does (a server's or GGUF's template, the fake model's none)."""
    spec = (spec or "").strip()
    base = bundled(spec)
    if base is not None:
        return base.template
    if workspace is not None and spec in workspace.config.models:
        cfg = workspace.config.models[spec]
        if cfg.backend == "local" and getattr(cfg, "path", None):
            return template_of(f"local:{cfg.path}")
        return template_of(f"{cfg.backend}:{getattr(cfg, 'model', None) or spec}")
    if spec.startswith("ft:") and workspace is not None:
        try:
            ft = read_finetuned(workspace, spec[3:])
        except UserError:
            return "unknown (fine-tune not found)"
        return template_of(ft.base, workspace) if ft.adapter is not None else folder_template(ft.weights)
    if spec == "fake" or spec.startswith("fake:"):
        return "none (the fake model answers without rendering)"
    backend, _, rest = spec.partition(":")
    if backend == "openai":
        return "the server's chat template"
    if backend == "llamacpp":
        return "the GGUF's chat template, plain text without one"
    target = rest if backend == "local" else spec
    if bundled(target) is not None:
        return bundled(target).template
    folder = Path(target).expanduser()
    return folder_template(folder) if folder.is_dir() else "unknown"
