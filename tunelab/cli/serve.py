"""`tunelab serve` (the gateway and web UI), `tunelab worker`, `tunelab keys ...`, `tunelab logs ...`."""

from __future__ import annotations

from typing import Optional

import typer

from tunelab.cli._common import console, print_json, workspace


def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    worker: bool = typer.Option(True, "--worker/--no-worker", help="Run background jobs in a thread of the server."),
    rate: float = typer.Option(20.0, help="Requests per second allowed per API key on average (0: no limit)."),
    burst: int = typer.Option(200, help="Requests an API key may send at once before the rate applies."),
    max_body: int = typer.Option(1_000_000, "--max-body", help="The largest request body in bytes (413 above)."),
    shadow_queue: int = typer.Option(1000, "--shadow-queue", help="Shadow answers waiting at most; more are dropped (and logged as dropped)."),
    shadow_worker: str = typer.Option("auto", "--shadow-worker", help="Where shadows answer: auto (a local model's in a worker process of its own "
                                           "at the lowest priority, a remote or fake one in a thread), process, thread."),
) -> None:
    """Serve deployments behind an OpenAI-compatible API (/v1/chat/completions, /v1/models, /v1/feedback) and the web UI."""
    from tunelab.server.app import serve as run_server

    run_server(workspace(), host=host, port=port, worker=worker, rate=rate, burst=burst, max_body=max_body,
               shadow_capacity=shadow_queue, shadow_worker=shadow_worker)


def worker(
    once: bool = typer.Option(False, "--once", help="Run the queued jobs, then exit (instead of waiting for more)."),
) -> None:
    """Run background jobs (evaluations, optimizations, fine-tunes) queued from the web UI or the API."""
    from tunelab.server.jobs import Worker

    w = Worker(workspace())
    if once:
        while (job_id := w.run_once()) is not None:
            console.print(f"job {job_id} finished")
        return
    console.print(f"worker {w.id} waiting for jobs (Ctrl-C to stop)")
    w.run_forever()


keys_app = typer.Typer(help="API keys of the team server (stored hashed; roles app (call deployments only), "
                            "viewer < editor < admin).",
                       no_args_is_help=True)


@keys_app.command("create")
def keys_create(
    name: str = typer.Option(..., "--name", help="Who or what uses the key (shown in call logs)."),
    role: str = typer.Option("viewer", "--role", help="app (call deployments only; sees its own calls), viewer "
                             "(read, call), editor (edit, run), admin (deploy, keys, users)."),
    deployment: list[str] = typer.Option([], "--deployment", "-d", help="Only these deployments may be called "
                                         "(repeatable; '*' matches any text, e.g. 'support@*'). Default: all."),
) -> None:
    """Make an API key; it is printed once and only its hash is stored."""
    from tunelab.server.auth import create_key

    info, secret = create_key(workspace(), name, role, deployments=deployment or None)
    console.print(f"key '{info['name']}' ({info['role']}); copy it now, it is not shown again:")
    typer.echo(secret)


@keys_app.command("list")
def keys_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the API keys (names, roles, last use; never the keys)."""
    from tunelab.server.auth import list_keys, utc_text

    rows = list_keys(workspace())
    if as_json:
        print_json(rows)
        return
    for k in rows:
        state = "revoked" if k["revoked"] else "active"
        console.print(f"{k['name']:<24} {k['role']:<7} {k['prefix']}…  {state:<8} last used {utc_text(k['last_used_at'])}",
                      markup=False)


@keys_app.command("revoke")
def keys_revoke(name: str = typer.Argument(..., help="The key's name.")) -> None:
    """Revoke an API key (its UI sessions end too)."""
    from tunelab.server.auth import revoke_key

    revoke_key(workspace(), name)
    console.print(f"key '{name}' revoked", markup=False)


logs_app = typer.Typer(help="Call logs of the gateway.", no_args_is_help=True)


@logs_app.command("list")
def logs_list(
    deployment: Optional[str] = typer.Option(None, help="Only calls of this deployment."),
    limit: int = typer.Option(20, help="How many of the newest calls."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show the newest gateway calls."""
    from tunelab.lifecycle.calls import calls_with_feedback, list_calls

    ws = workspace()
    rows = calls_with_feedback(ws, list_calls(ws, deployment, limit=limit))
    if as_json:
        print_json(rows)
        return
    for r in rows:
        console.print(f"{r['id']:>6} {r['created_at']} {r['key_name']:<12} {r['deployment']:<28} {r['status']:<5} "
                      f"{r['prompt_tokens']}+{r['completion_tokens']} tok {r['latency_s']:.3f}s  "
                      f"{(r['output'] or r['error'] or '')[:40]!r}", markup=False)


@logs_app.command("export")
def logs_export(
    to_dataset: str = typer.Option(..., "--to-dataset", help="Name of the dataset to save the calls as."),
    deployment: Optional[str] = typer.Option(None, help="Only calls of this deployment."),
    limit: Optional[int] = typer.Option(None, help="Only the newest N calls."),
) -> None:
    """Turn successful gateway calls into a dataset (split train) for the next evaluation or fine-tune."""
    from tunelab.lifecycle.calls import logs_to_dataset

    ds = logs_to_dataset(workspace(), to_dataset, deployment, limit=limit)
    console.print(f"saved dataset {ds.name}@{ds.version} ({sum(len(v) for v in ds.splits.values())} examples)",
                  markup=False)


@logs_app.command("feedback")
def logs_feedback(
    call_id: str = typer.Argument(..., help="The call's id (the response's id, header X-Tunelab-Call-Id)."),
    score: Optional[float] = typer.Option(None, "--score", help="1: the answer was right, 0: wrong (0 to 1)."),
    correction: Optional[str] = typer.Option(None, "--correction", help="The correct output."),
    note: str = typer.Option("", "--note", help="A note."),
) -> None:
    """Give feedback on a call (as POST /v1/feedback does): a score, the correct output, or both."""
    from tunelab.lifecycle.calls import add_feedback
    from tunelab.prompts import default_author

    ws = workspace()
    fb = add_feedback(ws, call_id, score=score, correction=correction, note=note, author=default_author(ws))
    console.print(f"feedback on {call_id} stored: " + ", ".join(f"{k} {v!r}" for k, v in fb.to_dict(brief=True).items()),
                  markup=False)


users_app = typer.Typer(help="Web UI users (name + password, scrypt-hashed; roles viewer < editor < admin; "
                             "also managed on the console's Users page).",
                        no_args_is_help=True)


@users_app.command("add")
def users_add(
    name: str = typer.Option(..., "--name", help="The user's login name."),
    role: str = typer.Option("viewer", "--role", help="viewer (read), editor (edit, run), admin (deploy, keys, users)."),
    password: str = typer.Option(..., "--password", prompt=True, hide_input=True, confirmation_prompt=True,
                                 envvar="TUNELAB_PASSWORD", help="The password (asked when not given; at least 8 characters)."),
) -> None:
    """Add a web UI user, or set an existing user's password and role."""
    from tunelab.server.auth import add_user

    info = add_user(workspace(), name, password, role)
    console.print(f"user '{info['name']}' ({info['role']}) ready", markup=False)


@users_app.command("list")
def users_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the web UI users."""
    from tunelab.server.auth import list_users, utc_text

    rows = list_users(workspace())
    if as_json:
        print_json(rows)
        return
    for u in rows:
        state = "disabled" if u["disabled"] else "active"
        console.print(f"{u['name']:<24} {u['role']:<7} {state:<8} last login {utc_text(u['last_login_at'])}", markup=False)


@users_app.command("disable")
def users_disable(name: str = typer.Argument(..., help="The user's name.")) -> None:
    """Disable a web UI user (their sessions end)."""
    from tunelab.server.auth import disable_user

    disable_user(workspace(), name)
    console.print(f"user '{name}' disabled", markup=False)
