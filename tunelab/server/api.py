"""The JSON API beside the gateway (Bearer key or UI session; roles as in `tunelab.server.auth`).

    GET  /api/prompts                 viewer   the prompts and their status
    GET  /api/logs?deployment=D       app      the newest call logs with their feedback (an app key: only its own calls)
    POST /api/logs/export             editor   {"name": DATASET, "deployment": D} -> a dataset
    GET  /api/jobs, /api/jobs/{id}    viewer   background jobs
    POST /api/jobs                    editor   {"kind": "eval"|"optimize"|"finetune", "args": {...}}
    GET  /api/whoami                  app      the caller's key name and role
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict

from tunelab.errors import NotFound, UserError
from tunelab.prompts import list_prompts
from tunelab.server.auth import KeyInfo, require
from tunelab.server.jobs import enqueue_job, get_job, job_dict, list_jobs
from tunelab.lifecycle.calls import CallFilter, calls_with_feedback, find_calls, logs_to_dataset

router = APIRouter(prefix="/api")


def _ws(request: Request):
    return request.app.state.workspace


def user_errors(fn):
    """Turn library errors into 400/404 JSON answers."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NotFound as exc:
            raise HTTPException(404, detail={"message": str(exc), "type": "not_found"}) from None
        except UserError as exc:
            raise HTTPException(400, detail={"message": str(exc), "type": "invalid_request"}) from None

    return wrapper


@router.get("/whoami")
def whoami(key: KeyInfo = Depends(require("app"))):
    return {"name": key.name, "role": key.role, "deployments": list(key.deployments) if key.deployments else None}


@router.get("/prompts")
@user_errors
def prompts(request: Request, key: KeyInfo = Depends(require("viewer"))):

    return {"prompts": [p.to_dict() for p in list_prompts(_ws(request))]}


@router.get("/logs")
def logs(request: Request, deployment: str | None = None, limit: int = 200, page: int = 1,
         key: KeyInfo = Depends(require("app"))):
    """The newest calls; a key whose role does not read logs (app) sees only its own calls."""
    where = CallFilter(deployment=deployment, key=None if key.reads_logs else key.name)
    rows, total = find_calls(_ws(request), where, page=max(1, page), per_page=max(1, min(limit, 5000)))
    return {"calls": calls_with_feedback(_ws(request), rows), "total": total}


class ExportBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    deployment: str | None = None


@router.post("/logs/export")
@user_errors
def export_logs(request: Request, body: ExportBody, key: KeyInfo = Depends(require("editor"))):

    ds = logs_to_dataset(_ws(request), body.name, body.deployment)
    return {"dataset": ds.name, "version": ds.version, "examples": sum(len(v) for v in ds.splits.values())}


class JobBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    args: dict[str, Any] = {}


@router.post("/jobs")
@user_errors
def start_job(request: Request, body: JobBody, key: KeyInfo = Depends(require("editor"))):

    return job_dict(enqueue_job(_ws(request), body.kind, body.args, created_by=key.name))


@router.get("/jobs")
def jobs(request: Request, key: KeyInfo = Depends(require("viewer"))):

    return {"jobs": [job_dict(j) for j in list_jobs(_ws(request))]}


@router.get("/jobs/{job_id}")
@user_errors
def job(request: Request, job_id: str, key: KeyInfo = Depends(require("viewer"))):

    return job_dict(get_job(_ws(request), job_id))
