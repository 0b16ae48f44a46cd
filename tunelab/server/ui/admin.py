"""Administration in the console (admins only): API keys (roles, an app key's deployments; the
secret shown once) and users (add, set password and role, disable, enable)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from tunelab.errors import UserError
from tunelab.server.auth import (KEY_ROLES, ROLES, KeyInfo, add_user, create_key, form_fields, list_keys, list_users,
                                 require, revoke_key, set_user)
from tunelab.server.ui.render import field, page, ws_of

router = APIRouter()
admin = require("admin")


def _keys(request: Request, status: int = 200, secret: str | None = None, error: str | None = None) -> HTMLResponse:
    response = page(request, "keys.html", status=status, keys=list_keys(ws_of(request)), secret=secret, error=error,
                    roles=KEY_ROLES)
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("/ui/keys", response_class=HTMLResponse)
def keys_page(request: Request, key: KeyInfo = Depends(admin)):
    return _keys(request)


@router.post("/ui/keys", response_class=HTMLResponse)
def create_key_form(request: Request, form: dict = Depends(form_fields), key: KeyInfo = Depends(admin)):
    name = field(form, "name")
    role = form.get("role", "viewer")
    allowed = [d for d in form.get("deployments", "").replace(",", " ").split() if d]
    try:
        _, secret = create_key(ws_of(request), name.strip(), role, deployments=allowed or None)
    except UserError as exc:
        return _keys(request, status=400, error=str(exc))
    return _keys(request, secret=secret)


@router.post("/ui/keys/{name}/revoke", response_class=HTMLResponse)
def revoke_key_form(request: Request, name: str, key: KeyInfo = Depends(admin)):
    try:
        revoke_key(ws_of(request), name)
    except UserError as exc:
        return _keys(request, status=400, error=str(exc))
    return _keys(request)


def _users(request: Request, status: int = 200, error: str | None = None, notice: str | None = None):
    return page(request, "users.html", status=status, users=list_users(ws_of(request)), roles=ROLES, error=error,
                notice=notice)


@router.get("/ui/users", response_class=HTMLResponse)
def users_page(request: Request, key: KeyInfo = Depends(admin)):
    return _users(request)


@router.post("/ui/users", response_class=HTMLResponse)
def add_user_form(request: Request, form: dict = Depends(form_fields), key: KeyInfo = Depends(admin)):
    """Add a user, or set an existing user's password and role."""
    name = field(form, "name").strip()
    try:
        add_user(ws_of(request), name, form.get("password", ""), form.get("role", "viewer"))
    except UserError as exc:
        return _users(request, status=400, error=str(exc))
    return _users(request, notice=f"saved user {name}")


@router.post("/ui/users/{name}", response_class=HTMLResponse)
def change_user_form(request: Request, name: str, form: dict = Depends(form_fields), key: KeyInfo = Depends(admin)):
    """Change a user's role, or disable / enable them (their sessions end)."""
    action = form.get("action", "")
    try:
        if action == "role":
            done = set_user(ws_of(request), name, role=form.get("role", ""))
            notice = f"{name} is now {done['role']} (their sessions ended: they log in again)"
        elif action in ("disable", "enable"):
            if action == "disable" and key.kind == "user" and key.name == name:
                raise UserError("you cannot disable yourself")
            set_user(ws_of(request), name, disabled=action == "disable")
            notice = f"{name} is disabled (their sessions ended)" if action == "disable" else f"{name} is enabled"
        else:
            raise UserError(f"unknown action '{action}'")
    except UserError as exc:
        return _users(request, status=400, error=str(exc))
    return _users(request, notice=notice)
