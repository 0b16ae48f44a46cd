"""The web console: server-rendered Jinja2 pages with HTMX and a vendored CodeMirror editor (all
served from /static, nothing from a CDN; scripts only from files, as the CSP demands).

Modules: `render` (the template environment, `page`, the friendly error page), `prompts` (the
prompt workspace: editor, preview, playground, commits, history, diffs, versions, deploys),
`logs` (the call log: filters, paging, detail, charts, feedback), `monitor` (drift and health,
rollouts, promotions), `pages` (login, datasets, runs,
comparisons, jobs), `admin` (keys and users). Roles are checked by the same dependency as the API:
viewers read, editors edit/commit/run/start jobs, admins deploy and manage keys and users.
"""

from __future__ import annotations

from tunelab.server.ui import admin, logs, monitor, pages, prompts
from tunelab.server.ui.render import HERE, error_page

__all__ = ["error_page", "mount_ui"]


def mount_ui(app) -> None:
    from fastapi.staticfiles import StaticFiles

    for module in (pages, prompts, logs, monitor, admin):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
