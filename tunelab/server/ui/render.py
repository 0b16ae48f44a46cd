"""What every console page shares: the Jinja2 environment (autoescaping everything), `page()`,
form helpers and the friendly error page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse

from tunelab.datasets import validate_name
from tunelab.errors import UserError

HERE = Path(__file__).parent


def _env():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["t"] = lambda v: v.isoformat(sep=" ", timespec="seconds") if v else "-"
    env.filters["num"] = lambda v, d=3: "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))
    env.filters["clip"] = lambda v, n=160: (v if len(v or "") <= n else v[:n - 1] + "…") if isinstance(v, str) else v
    return env


ENV = _env()


def page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    key = getattr(request.state, "key", None)
    html = ENV.get_template(template).render(request=request, key=key, csrf=getattr(request.state, "csrf", ""),
                                             **context)
    return HTMLResponse(html, status_code=status)


TITLES = {400: "That did not work", 401: "Please log in", 403: "Not allowed", 404: "Not found",
          405: "Not allowed", 413: "Too large", 429: "Slow down", 500: "Something went wrong"}


def error_page(request: Request, status: int, message: str, headers=None) -> HTMLResponse:
    """A page that says what went wrong, in words, with the way back (never raw JSON)."""
    response = page(request, "error.html", status=status, title=TITLES.get(status, "Error"), message=message,
                    code=status)
    for k, v in (headers or {}).items():
        response.headers[k] = v
    return response


def bad_request(message: str) -> HTTPException:
    return HTTPException(400, detail={"message": message, "type": "invalid_request_error"})


def not_found(message: str) -> HTTPException:
    return HTTPException(404, detail={"message": message, "type": "invalid_request_error", "code": "not_found"})


def field(form: dict, name: str) -> str:
    if name not in form:
        raise bad_request(f"missing form field '{name}'")
    return form[name]


def int_field(form: dict, name: str, default: int) -> int:
    try:
        return int(form.get(name) or default)
    except ValueError:
        raise bad_request(f"form field '{name}' must be a number") from None


def ws_of(request: Request):
    return request.app.state.workspace


def checked_name(name: str, what: str = "prompt") -> str:
    try:
        validate_name(name, what)
    except UserError:
        raise not_found(f"no such {what}") from None
    return name


def fragment_error(exc: Exception | str) -> HTMLResponse:
    html = ENV.get_template("_error.html").render(message=str(exc))
    return HTMLResponse(html, status_code=200)


def polyline(points: list, width: int = 240, height: int = 60) -> str:
    """An SVG polyline's points for a list of numbers (a training curve, latency by hour)."""
    values = [float(p) for p in points if isinstance(p, (int, float))]
    if len(values) < 2:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    step = width / (len(values) - 1)
    return " ".join(f"{i * step:.1f},{height - (v - lo) / span * height:.1f}" for i, v in enumerate(values))


def bars(values: list, width: int = 240, height: int = 60) -> list[tuple[float, float, float, float]]:
    """SVG bars (x, y, w, h) for a list of non-negative numbers (calls or cost per hour)."""
    if not values:
        return []
    top = max(values) or 1.0
    w = width / len(values)
    return [(i * w, height - v / top * height, max(0.5, w - 1), v / top * height) for i, v in enumerate(values)]
