"""The sandbox prompts are rendered in: one Jinja2 environment (`ImmutableSandboxedEnvironment`,
`StrictUndefined`, no autoescape) whose rendering stays bounded, and the placeholder values a
commit's render check gives the fields a sample lacks.

A template is code an editor writes; rendering it must stay bounded. Every rendered part is at
most MAX_RENDERED characters, no single operation inside a template may build a bigger string or
list (`*`, `+`, `~`, `%`, `join`, `replace`, `format`, and methods or filters given a width like
`ljust`, `center`), loops draw from `range` of at most 100,000 items (the sandbox's own limit),
and one render (all parts, demos included) stops after RENDER_SECONDS of its thread's CPU time
(`render_limits`: a trace function on the template's own frames; CPU time, not wall time, so a
starved process on a busy machine does not fail a template that is merely waiting its turn). Each limit raises `RenderLimit`, which the prompt turns
into a UserError naming the file and line — never a thread held for minutes.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from typing import Any

MAX_RENDERED = 1_000_000  # characters (or items) one rendered part, or one operation in a template, may make
RENDER_SECONDS = 2.0


class RenderLimit(Exception):
    """A template went past a size or time limit while rendering."""


_env = None
_deadline = threading.local()


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple, dict)) else 0


def _check_size(n: int, what: str) -> None:
    if n > MAX_RENDERED:
        raise RenderLimit(f"{what} would make {n:,} characters or items (the limit is {MAX_RENDERED:,})")


_WIDE = re.compile(r"\d{7,}")  # a width or precision of a million or more in a format string


def _check_args(fn: Any, args: tuple, kwargs: dict) -> None:
    """Refuse calls that would build an oversized string or list before they run."""
    name = getattr(fn, "__name__", "")
    ints = [a for a in (*args, *kwargs.values()) if isinstance(a, int) and not isinstance(a, bool)]
    if any(abs(i) > MAX_RENDERED for i in ints):
        raise RenderLimit(f"'{name}' with a width or count over {MAX_RENDERED:,}")
    owner = getattr(fn, "__self__", None)
    if owner is None:  # the sandbox wraps str.format
        owner = getattr(getattr(fn, "__wrapped__", None), "__self__", None)
    if not isinstance(owner, str):
        return
    if name in ("format", "format_map") and _WIDE.search(owner):
        raise RenderLimit(f"'{name}' with a width over {MAX_RENDERED:,}")
    if name == "join" and args and isinstance(args[0], (list, tuple, str)):
        _check_size(sum(len(str(i)) for i in args[0]) + len(owner) * max(0, len(args[0]) - 1), "join")
    if name == "replace" and len(args) >= 2 and isinstance(args[1], str):
        old = str(args[0])
        hits = owner.count(old) if old else len(owner) + 1
        _check_size(len(owner) + hits * len(args[1]), "replace")


def _guard_filter(fn):
    """A filter that checks its arguments first (a width like `center(5000000)`, a `join` or a
    `format` that would build an oversized string)."""
    import functools

    passes = getattr(fn, "jinja_pass_arg", None) is not None
    name = getattr(fn, "__name__", "").removeprefix("do_")

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        value, rest = (args[1:2], args[2:]) if passes else (args[:1], args[1:])
        _check_args(fn, rest, kwargs)
        if name == "join" and value and isinstance(value[0], (list, tuple)):
            sep = rest[0] if rest and isinstance(rest[0], str) else ""
            _check_size(sum(len(str(i)) for i in value[0]) + len(sep) * max(0, len(value[0]) - 1), "join")
        if name == "format" and value and isinstance(value[0], str) and _WIDE.search(value[0]):
            raise RenderLimit(f"'format' with a width over {MAX_RENDERED:,}")
        return fn(*args, **kwargs)

    return guarded


def _trace(frame, event, arg):
    if frame.f_code.co_filename == "<template>":
        return _trace_line
    return None


def _trace_line(frame, event, arg):
    until = getattr(_deadline, "until", None)
    if event == "line" and until is not None and time.thread_time() > until:
        raise RenderLimit(f"rendering took longer than {RENDER_SECONDS:g} s of CPU (a runaway loop?)")
    return _trace_line


class render_limits:
    """While active (one render of one example), template code in this thread stops at the deadline."""

    def __enter__(self):
        self.outer = getattr(_deadline, "until", None)
        if self.outer is None:
            _deadline.until = time.thread_time() + RENDER_SECONDS
            self.previous = sys.gettrace()
            sys.settrace(_trace)
        return self

    def __exit__(self, *exc):
        if self.outer is None:
            sys.settrace(self.previous)
            _deadline.until = None
        return False


def jinja_env():
    """The one sandboxed Jinja2 environment prompts are rendered in."""
    global _env
    if _env is None:
        from jinja2 import StrictUndefined
        from jinja2.compiler import CodeGenerator
        from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

        class GuardedCodeGenerator(CodeGenerator):
            def visit_Concat(self, node, frame):  # `a ~ b`: through the size check
                self.write("environment.concat_guarded((")
                for arg in node.nodes:
                    self.visit(arg, frame)
                    self.write(", ")
                self.write("))")

        class PromptEnvironment(ImmutableSandboxedEnvironment):
            intercepted_binops = frozenset(["*", "**", "+", "%"])
            code_generator_class = GuardedCodeGenerator

            def call_binop(self, context, operator, left, right):
                if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                    raise SecurityError("exponent too large")
                if operator == "*":
                    for a, b in ((left, right), (right, left)):
                        if isinstance(a, (str, list, tuple)) and isinstance(b, int) and len(a) * b > MAX_RENDERED:
                            raise SecurityError("repetition too large")
                if operator == "+":
                    _check_size(_size(left) + _size(right), "'+'")
                if operator == "%" and isinstance(left, str) and _WIDE.search(left):
                    raise RenderLimit(f"'%' with a width over {MAX_RENDERED:,}")
                return super().call_binop(context, operator, left, right)

            def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
                _check_args(__obj, args, kwargs)
                return super().call(__context, __obj, *args, **kwargs)

            def concat_guarded(self, values):
                parts = [str(v) for v in values]
                _check_size(sum(map(len, parts)), "'~'")
                return "".join(parts)

        _env = PromptEnvironment(undefined=StrictUndefined, autoescape=False,
                                 trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
        _env.filters = {name: _guard_filter(fn) for name, fn in _env.filters.items()}
    return _env


class Placeholder(str):
    """The value of a field a sample lacks (`Prompt.check_renders`): its name as text, and the
    same again for whatever is reached through it (`x.y`, `x[0]`, a loop over it, arithmetic)."""

    def __getattr__(self, name: str) -> "Placeholder":
        if name.startswith("_"):
            raise AttributeError(name)
        return self

    def __getitem__(self, key: Any) -> "Placeholder":  # type: ignore[override]
        return self

    def __iter__(self):  # type: ignore[override]
        return iter([self])

    def __add__(self, other: Any) -> "Placeholder":  # type: ignore[override]
        return self

    __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __floordiv__ = __mod__ = __add__

    def __lt__(self, other: Any) -> bool:  # type: ignore[override]
        return False

    __gt__ = __le__ = __ge__ = __lt__

    def __int__(self) -> int:
        return 0

    def __float__(self) -> float:
        return 0.0
