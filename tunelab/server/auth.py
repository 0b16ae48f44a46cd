"""API keys, roles, UI sessions and rate limits of the team server.

A key looks like `tl-<43 url-safe characters>`; the store keeps only its sha256 (the key is shown
once, when it is made). Roles: `app` calls deployments and nothing else (optionally only the
deployments it names: `deployments=["support@production", "ft:*"]`, glob patterns) and sees only
its own calls; then, ordered, viewer (read everything, logs included, and call) < editor (edit,
commit, run, evaluate, start jobs) < admin (deploy: tag labels; keys and users). A server serves
one workspace and reads keys from that workspace's database, so a key of another workspace is
unknown here.

    key, secret = create_key(ws, "alice", "editor")   # secret: "tl-...", never stored
    authenticate(ws, secret)  -> KeyInfo(name="alice", role="editor") | None

Users log into the web UI with a name and password (scrypt-hashed, `add_user`); applications use
API keys. Both carry a role; a user's UI session acts with the user's role. `require(role)` is the
FastAPI dependency every endpoint of the gateway, the API and the UI declares.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from fastapi import HTTPException, Request
from sqlalchemy import delete, select, update
from starlette.concurrency import run_in_threadpool

from tunelab.errors import NotFound, UserError
from tunelab.store.models import ApiKeyRow, UiSessionRow, UserRow, utcnow

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

ROLES = ("viewer", "editor", "admin")  # ordered: each may do what the ones before it may
KEY_ROLES = ("app", *ROLES)  # an app key calls deployments only; a user is never one
KEY_PREFIX = "tl-"
SESSION_HOURS = 12


@dataclass(frozen=True)
class KeyInfo:
    """Who is calling: an API key or a logged-in user (`kind`), with a role."""

    id: int
    name: str
    role: str
    kind: str = "key"  # key | user
    deployments: tuple[str, ...] | None = None  # glob patterns of the deployments it may call (None: all)

    def can(self, role: str) -> bool:
        """Whether this key may do what `role` may: "app" (call deployments) is every role's."""
        if role == "app":
            return True
        if self.role == "app":
            return False
        return ROLES.index(self.role) >= ROLES.index(role)

    def may_call(self, deployment: str) -> bool:
        return self.deployments is None or any(fnmatch.fnmatchcase(deployment, p) for p in self.deployments)

    @property
    def reads_logs(self) -> bool:
        """Every call's log (else only its own calls)."""
        return self.can("viewer")


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def check_role(role: str, roles: tuple[str, ...] = ROLES) -> str:
    if role not in roles:
        raise UserError(f"unknown role '{role}': expected one of {', '.join(roles)}", field="role")
    return role


DEPLOYMENT_PATTERN = re.compile(r"[A-Za-z0-9*?][A-Za-z0-9_.@:*?\-]{0,199}")


def create_key(ws: "Workspace", name: str, role: str = "viewer",
               deployments: list[str] | None = None) -> tuple[dict, str]:
    """Make an API key; returns (its public description, the secret key — shown only now).
    `deployments` limits the deployments it may call (glob patterns; None: all)."""

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@\-]{0,99}", name or ""):
        raise UserError(f"invalid key name '{name}': use letters, digits, '-', '_', '.', '@' (at most 100)",
                        field="name")
    check_role(role, KEY_ROLES)
    if deployments is not None:
        deployments = [d.strip() for d in deployments if d.strip()]
        bad = [d for d in deployments if not DEPLOYMENT_PATTERN.fullmatch(d)]
        if bad or not deployments or len(deployments) > 100:
            raise UserError(f"invalid deployment pattern '{bad[0] if bad else ''}': a deployment name such as "
                            "support@production or ft:NAME ('*' matches any text)", field="deployments")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    with ws.store.session() as s:
        if s.scalar(select(ApiKeyRow.id).where(ApiKeyRow.name == name)) is not None:
            raise UserError(f"a key named '{name}' exists already (revoke it or pick another name)")
        meta = {"deployments": deployments} if deployments is not None else {}
        row = ApiKeyRow(name=name, key_hash=hash_key(secret), prefix=secret[:7], role=role, meta=meta)
        s.add(row)
        s.flush()
        info = _describe(row)
    return info, secret


def _describe(row) -> dict:
    return {"id": row.id, "name": row.name, "role": row.role, "prefix": row.prefix,
            "deployments": (row.meta or {}).get("deployments"),
            "created_at": row.created_at, "last_used_at": row.last_used_at, "revoked": row.revoked_at is not None}


def _key_info(row) -> KeyInfo:
    allowed = (row.meta or {}).get("deployments")
    return KeyInfo(row.id, row.name, row.role, deployments=tuple(allowed) if allowed is not None else None)


def list_keys(ws: "Workspace") -> list[dict]:

    with ws.store.session() as s:
        return [_describe(r) for r in s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.id))]


def revoke_key(ws: "Workspace", name: str) -> None:
    """Revoke the key called `name` (its sessions end too)."""

    with ws.store.session() as s:
        row = s.scalar(select(ApiKeyRow).where(ApiKeyRow.name == name))
        if row is None:
            raise NotFound(f"unknown key '{name}' (see: tunelab keys list)")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
        s.execute(delete(UiSessionRow).where(UiSessionRow.key_id == row.id))


def authenticate(ws: "Workspace", secret: str | None) -> KeyInfo | None:
    """The key `secret` names, unless it is unknown or revoked."""

    if not secret or not secret.startswith(KEY_PREFIX) or len(secret) > 200:
        return None
    with ws.store.session() as s:
        row = s.scalar(select(ApiKeyRow).where(ApiKeyRow.key_hash == hash_key(secret)))
        if row is None or row.revoked_at is not None:
            return None
        now = utcnow()
        if row.last_used_at is None or now - row.last_used_at > timedelta(seconds=60):
            s.execute(update(ApiKeyRow).where(ApiKeyRow.id == row.id).values(last_used_at=now))
        return _key_info(row)


# -- users -------------------------------------------------------------------------------------
SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, dklen=32, **SCRYPT)
    return f"scrypt${SCRYPT['n']}${SCRYPT['r']}${SCRYPT['p']}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    import hmac

    try:
        _, n, r, p, salt, digest = stored.split("$")
        got = hashlib.scrypt(password.encode("utf-8"), salt=bytes.fromhex(salt), dklen=32, n=int(n), r=int(r),
                             p=int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), digest)


def add_user(ws: "Workspace", name: str, password: str, role: str = "viewer") -> dict:
    """Add a web UI user (or set an existing user's password and role)."""

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@\-]{0,99}", name or ""):
        raise UserError(f"invalid user name '{name}': use letters, digits, '-', '_', '.', '@' (at most 100)",
                        field="name")
    check_role(role)
    if len(password or "") < 8:
        raise UserError("a password needs at least 8 characters", field="password")
    with ws.store.session() as s:
        row = s.scalar(select(UserRow).where(UserRow.name == name))
        if row is None:
            row = UserRow(name=name, password_hash=hash_password(password), role=role)
            s.add(row)
        else:
            row.password_hash, row.role, row.disabled_at = hash_password(password), role, None
        s.flush()
        return {"id": row.id, "name": row.name, "role": row.role}


def list_users(ws: "Workspace") -> list[dict]:

    with ws.store.session() as s:
        return [{"name": r.name, "role": r.role, "created_at": r.created_at, "last_login_at": r.last_login_at,
                 "disabled": r.disabled_at is not None} for r in s.scalars(select(UserRow).order_by(UserRow.id))]


def set_user(ws: "Workspace", name: str, role: str | None = None, disabled: bool | None = None) -> dict:
    """Change a user's role, or disable (their sessions end) / enable them."""
    with ws.store.session() as s:
        row = s.scalar(select(UserRow).where(UserRow.name == name))
        if row is None:
            raise NotFound(f"unknown user '{name}' (see: tunelab users list)")
        if role is not None:
            row.role = check_role(role)
            s.execute(delete(UiSessionRow).where(UiSessionRow.user_id == row.id))
        if disabled is True:
            row.disabled_at = row.disabled_at or utcnow()
            s.execute(delete(UiSessionRow).where(UiSessionRow.user_id == row.id))
        elif disabled is False:
            row.disabled_at = None
        return {"name": row.name, "role": row.role, "disabled": row.disabled_at is not None}


def disable_user(ws: "Workspace", name: str) -> None:
    """Disable a user (their sessions end)."""

    with ws.store.session() as s:
        row = s.scalar(select(UserRow).where(UserRow.name == name))
        if row is None:
            raise NotFound(f"unknown user '{name}' (see: tunelab users list)")
        row.disabled_at = row.disabled_at or utcnow()
        s.execute(delete(UiSessionRow).where(UiSessionRow.user_id == row.id))


def login_user(ws: "Workspace", name: str, password: str) -> KeyInfo | None:
    """The user `name` when `password` is right and the user is not disabled."""

    with ws.store.session() as s:
        row = s.scalar(select(UserRow).where(UserRow.name == name))
        if row is None:
            hash_password(password)  # the same work as for a real user: no timing oracle for names
            return None
        if row.disabled_at is not None or not verify_password(password, row.password_hash):
            return None
        row.last_login_at = utcnow()
        return KeyInfo(row.id, row.name, row.role, kind="user")


# -- UI sessions ------------------------------------------------------------------------------
def create_session(ws: "Workspace", who: KeyInfo) -> tuple[str, str]:
    """A login for a key or a user: returns (cookie token, CSRF token). Only the token's sha256 is
    stored."""

    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    ids = {"user_id": who.id} if who.kind == "user" else {"key_id": who.id}
    with ws.store.session() as s:
        s.add(UiSessionRow(id=hash_key(token), csrf=csrf, expires_at=utcnow() + timedelta(hours=SESSION_HOURS), **ids))
    return token, csrf


def session_key(ws: "Workspace", token: str | None) -> tuple[KeyInfo, str] | None:
    """(who, CSRF token) of a live session, or None."""

    if not token or len(token) > 200:
        return None
    with ws.store.session() as s:
        sess = s.get(UiSessionRow, hash_key(token))
        if sess is None or sess.expires_at < utcnow():
            return None
        if sess.user_id is not None:
            user = s.get(UserRow, sess.user_id)
            if user is None or user.disabled_at is not None:
                return None
            return KeyInfo(user.id, user.name, user.role, kind="user"), sess.csrf
        row = s.get(ApiKeyRow, sess.key_id)
        if row is None or row.revoked_at is not None:
            return None
        return _key_info(row), sess.csrf


def end_session(ws: "Workspace", token: str | None) -> None:

    if token:
        with ws.store.session() as s:
            s.execute(delete(UiSessionRow).where(UiSessionRow.id == hash_key(token)))


# -- rate limits ------------------------------------------------------------------------------
class RateLimiter:
    """A token bucket per key: `rate` requests a second on average, bursts up to `burst`."""

    def __init__(self, rate: float = 20.0, burst: int = 200):
        self.rate, self.burst = float(rate), float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, who: str) -> float:
        """0 when a request may go now, else the seconds to wait before retrying."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(who, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[who] = (tokens - 1.0, now)
                return 0.0
            self._buckets[who] = (tokens, now)
            return (1.0 - tokens) / self.rate


def utc_text(value: datetime | None) -> str:
    return value.isoformat(sep=" ", timespec="seconds") if value else "-"


# -- the dependency every endpoint declares ------------------------------------------------------
def require(role: str):
    """A FastAPI dependency: the caller's key, which must have at least `role`.

    A key comes from `Authorization: Bearer tl-...`, or from the UI session cookie; a cookie
    request that changes something (any method but GET/HEAD) must carry the session's CSRF token
    (form field `csrf` or header `X-CSRF-Token`). Every accepted key takes a token from its bucket.
    """
    async def dependency(request: Request) -> KeyInfo:
        app = request.app
        ws = app.state.workspace
        if not app.state.auth:
            return KeyInfo(0, "anonymous", "admin")
        header = request.headers.get("authorization", "")
        key = None
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() == "bearer":
                key = await run_in_threadpool(authenticate, ws, token.strip())
            if key is None:
                raise HTTPException(401, detail={"message": "invalid API key", "type": "invalid_api_key"},
                                    headers={"WWW-Authenticate": "Bearer"})
        else:
            found = await run_in_threadpool(session_key, ws, request.cookies.get(SESSION_COOKIE))
            if found is None:
                raise HTTPException(401, detail={"message": "an API key is required (Authorization: Bearer KEY)",
                                                 "type": "invalid_api_key"}, headers={"WWW-Authenticate": "Bearer"})
            key, csrf = found
            request.state.csrf = csrf
            if request.method not in ("GET", "HEAD"):
                sent = request.headers.get("x-csrf-token")
                if sent is None:
                    sent = (await form_fields(request)).get("csrf")
                if not sent or not hmac.compare_digest(str(sent), csrf):
                    raise HTTPException(403, detail={"message": "missing or wrong CSRF token", "type": "csrf"})
        wait = app.state.limiter.take(f"{key.kind}:{key.name}")
        if wait > 0:
            raise HTTPException(429, detail={"message": f"rate limit for key '{key.name}'", "type": "rate_limit"},
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        if not key.can(role):
            raise HTTPException(403, detail={"message": f"this needs the {role} role (key '{key.name}' is "
                                                        f"{key.role})", "type": "forbidden"})
        request.state.key = key
        return key

    return dependency


SESSION_COOKIE = "tunelab_session"
MAX_FORM_BYTES = 2_000_000


async def form_fields(request: Request) -> dict[str, str]:
    """The fields of an `application/x-www-form-urlencoded` body (what HTML forms and HTMX send),
    parsed once per request; other bodies have no fields."""
    cached = getattr(request.state, "form_fields", None)
    if cached is not None:
        return cached
    fields: dict[str, str] = {}
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, detail={"message": "form too large", "type": "invalid_request"})
        fields = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    request.state.form_fields = fields
    return fields
