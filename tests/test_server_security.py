"""Security of the team server: keys, roles, CSRF, workspace isolation, injection, sandbox, secrecy."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from tunelab.files import write_atomic
from tunelab.prompts import commit_prompt, tag_prompt
from tunelab.server.app import create_app
from tunelab.server.auth import SESSION_COOKIE
from tunelab.server.auth import create_key
from tunelab.workspace import Workspace

PROMPT = """---
model: fake
output: {type: text}
---
user:
{{ input }}
"""


@pytest.fixture
def server(workspace):
    write_atomic(workspace.prompts_dir / "greet.prompt", PROMPT)
    commit_prompt(workspace, "greet", "first")
    tag_prompt(workspace, "greet@current", "production")
    keys = {role: create_key(workspace, f"{role}-key", role)[1] for role in ("viewer", "editor", "admin")}
    client = TestClient(create_app(workspace), base_url="http://127.0.0.1")
    return workspace, client, keys


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def chat(client, key, content="hello", model="greet@production"):
    return client.post("/v1/chat/completions", headers=bearer(key) if key else {},
                       json={"model": model, "messages": [{"role": "user", "content": content}]})


def login(client, key) -> str:
    """Log the client in; returns the page's CSRF token."""
    r = client.post("/login", data={"api_key": key}, follow_redirects=False)
    assert r.status_code == 303 and SESSION_COOKIE in r.cookies
    set_cookie = r.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie
    page = client.get("/ui/prompts")
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1) if 'name="csrf"' in page.text else \
        re.search(r'"X-CSRF-Token": "([^"]+)"', page.text).group(1)


def test_no_key_or_a_wrong_key_is_401_everywhere(server):
    ws, client, keys = server
    assert chat(client, None).status_code == 401
    assert chat(client, "tl-not-a-real-key").status_code == 401
    assert client.get("/v1/models").status_code == 401
    assert client.get("/api/logs").status_code == 401
    assert client.get("/api/jobs", headers={"Authorization": "Basic abc"}).status_code == 401
    # pages send the browser to the login page; posts are refused
    r = client.get("/ui/prompts", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.post("/ui/prompts/greet/commit", data={"text": PROMPT, "message": "x"}).status_code == 401
    assert chat(client, keys["viewer"]).status_code == 200


def test_a_revoked_key_is_401_and_its_sessions_end(server, cli):
    ws, client, keys = server
    login(client, keys["editor"])
    assert cli("keys", "revoke", "editor-key").exit_code == 0
    assert chat(client, keys["editor"]).status_code == 401
    assert client.get("/ui/prompts", follow_redirects=False).status_code == 303


def test_roles_viewer_cannot_edit_editor_cannot_deploy(server):
    ws, client, keys = server
    assert client.post("/api/jobs", headers=bearer(keys["viewer"]),
                       json={"kind": "eval", "args": {"candidate": "greet", "data": "x"}}).status_code == 403
    assert client.post("/api/logs/export", headers=bearer(keys["viewer"]), json={"name": "d"}).status_code == 403
    # a viewer logged into the UI, with a valid CSRF token, still may not commit
    csrf = login(client, keys["viewer"])
    before = (ws.prompts_dir / "greet.prompt").read_text()
    r = client.post("/ui/prompts/greet/commit", data={"csrf": csrf, "text": PROMPT + "x\n", "message": "m"})
    assert r.status_code == 403
    assert (ws.prompts_dir / "greet.prompt").read_text() == before
    assert client.get("/ui/keys").status_code == 403
    # an editor may commit but not deploy
    client.cookies.clear()
    csrf = login(client, keys["editor"])
    r = client.post("/ui/prompts/greet/commit", data={"csrf": csrf, "text": PROMPT + "Be brief.\n", "message": "m"})
    assert r.status_code == 200 and "committed" in r.text
    r = client.post("/ui/prompts/greet/tag", data={"csrf": csrf, "version": "current", "label": "production"})
    assert r.status_code == 403


def test_bad_or_missing_csrf_token_is_403(server):
    ws, client, keys = server
    csrf = login(client, keys["admin"])
    text = PROMPT + "changed\n"
    assert client.post("/ui/prompts/greet/commit", data={"text": text, "message": "m"}).status_code == 403
    assert client.post("/ui/prompts/greet/commit", data={"csrf": "forged", "text": text, "message": "m"}).status_code == 403
    assert client.post("/ui/prompts/greet/commit", headers={"X-CSRF-Token": "forged"},
                       data={"text": text, "message": "m"}).status_code == 403
    assert client.post("/ui/prompts/greet/commit", headers={"X-CSRF-Token": csrf},
                       data={"text": text, "message": "m"}).status_code == 200


def test_another_workspaces_key_is_unknown_here(server, tmp_path):
    ws, client, keys = server
    other = Workspace.init(tmp_path / "other")
    _, other_key = create_key(other, "admin-key", "admin")
    assert chat(client, other_key).status_code == 401
    assert client.post("/login", data={"api_key": other_key}).status_code == 401
    with TestClient(create_app(other)) as other_client:
        assert other_client.post("/v1/chat/completions", headers=bearer(keys["admin"]),
                                 json={"model": "fake", "messages": [{"role": "user", "content": "x"}]}).status_code == 401


@pytest.mark.parametrize("name", ["../x", "..%2Fx", "../../tunelab", "local:/etc", "local:../../x",
                                  "/etc/passwd.prompt", "../greet.prompt", "greet@../../x", "ft:../x", "hybrid:../x"])
def test_no_deployment_name_escapes_the_workspace(server, name):
    ws, client, keys = server
    (ws.root.parent / "x.prompt").write_text(PROMPT)
    r = chat(client, keys["admin"], model=name)
    assert r.status_code in (400, 404), r.text
    assert "error" in r.json()


@pytest.mark.parametrize("path", ["/ui/prompts/..%2F..%2Fx", "/ui/prompts/%2E%2E/history", "/ui/datasets/..%2Fx",
                                  "/ui/prompts/greet/diff?a=..%2F..%2Fx&b=current", "/ui/runs/..%2F..%2Fx",
                                  "/ui/comparisons/..%2Fx/report"])
def test_no_page_takes_a_path_out_of_the_workspace(server, path):
    ws, client, keys = server
    (ws.root.parent / "x.prompt").write_text("---\nmodel: fake\n---\nSECRET OUTSIDE\n")
    login(client, keys["admin"])
    r = client.get(path, follow_redirects=False)
    assert r.status_code == 404, (path, r.status_code)
    assert "SECRET OUTSIDE" not in r.text


INJECTIONS = ["'); DROP TABLE call_logs; --", "<script>alert('x')</script>", "\"><img src=x onerror=alert(1)>"]


def test_sql_and_html_injection_strings_are_inert(server):
    ws, client, keys = server
    body = PROMPT + "".join(f"{s}\n" for s in INJECTIONS)
    csrf = login(client, keys["admin"])
    for s in INJECTIONS:
        assert chat(client, keys["viewer"], content=s).status_code == 200
    r = client.post("/ui/prompts/greet/commit", data={"csrf": csrf, "text": body, "message": INJECTIONS[0] + INJECTIONS[1]})
    assert r.status_code == 200 and "committed" in r.text
    r = client.post("/ui/prompts", data={"csrf": csrf, "name": INJECTIONS[1]})
    assert r.status_code == 400 and "<script>" not in r.text and "&lt;script&gt;" in r.text
    for page in ("/ui/logs", "/ui/prompts/greet"):
        html = client.get(page).text
        assert "<script>alert" not in html and "<img src=x" not in html
        assert "&lt;script&gt;alert(" in html
    preview = client.post("/ui/prompts/greet/render", headers={"X-CSRF-Token": csrf},
                          data={"text": body, "sample": INJECTIONS[2]}).text
    assert "<img src=x" not in preview and "&lt;img src=x" in preview
    # the database is intact and holds the strings as plain text
    from tunelab.lifecycle.calls import list_calls

    calls = list_calls(ws)
    assert {c.output for c in calls} >= set(INJECTIONS)
    r = client.get("/api/logs", headers=bearer(keys["viewer"]))
    assert r.status_code == 200 and len(r.json()["calls"]) == len(INJECTIONS)


@pytest.mark.parametrize("payload", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ input.__class__.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% set x = [].__class__.__base__.__subclasses__() %}{{ x }}",
])
def test_sandbox_escapes_in_a_prompt_body_fail_with_an_error(server, payload):
    ws, client, keys = server
    csrf = login(client, keys["admin"])
    text = PROMPT.replace("{{ input }}", payload)
    r = client.post("/ui/prompts/greet/render", headers={"X-CSRF-Token": csrf}, data={"text": text, "sample": "x"})
    assert r.status_code == 200 and 'class="error"' in r.text
    assert "uid=" not in r.text and "subprocess" not in r.text.lower() and "Popen" not in r.text
    r = client.post("/ui/prompts/greet/run", headers={"X-CSRF-Token": csrf}, data={"text": text, "sample": "x"})
    assert 'class="error"' in r.text and "uid=" not in r.text


def test_keys_never_appear_in_logs_pages_or_the_database(server, cli, capsys):
    ws, client, keys = server
    for key in keys.values():
        assert chat(client, key, content="ping").status_code == 200
    csrf = login(client, keys["admin"])
    r = client.post("/ui/keys", data={"csrf": csrf, "name": "newcomer", "role": "viewer"})
    new_key = re.search(r'id="new-key">([^<]+)<', r.text).group(1)
    assert r.headers["cache-control"] == "no-store"
    all_keys = [*keys.values(), new_key]
    pages = [client.get(p).text for p in ("/ui/keys", "/ui/logs", "/ui/prompts", "/ui/prompts/greet", "/ui/jobs")]
    pages.append(client.get("/api/logs", headers=bearer(keys["admin"])).text)
    listing = cli("keys", "list").output + cli("keys", "list", "--json").output + cli("logs", "list").output
    db_bytes = b""
    for path in ws.state_dir.glob("tunelab.db*"):
        db_bytes += path.read_bytes()
    logged = capsys.readouterr()
    for key in all_keys:
        secret = key[len("tl-"):]
        for text in (*pages, listing, logged.out, logged.err):
            assert secret not in text
        assert secret.encode() not in db_bytes
    assert "viewer-key" in pages[1]  # the logs name the key, not the key


def test_rate_limit_per_key_is_429_with_retry_after(workspace):
    write_atomic(workspace.prompts_dir / "greet.prompt", PROMPT)
    _, a = create_key(workspace, "a", "viewer")
    _, b = create_key(workspace, "b", "viewer")
    client = TestClient(create_app(workspace, rate=0.5, burst=3))
    codes = [chat(client, a, model="greet").status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    r = chat(client, a, model="greet")
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert chat(client, b, model="greet").status_code == 200  # buckets are per key


def test_users_log_in_with_a_password_and_act_with_their_role(server, cli):
    ws, client, keys = server
    assert cli("users", "add", "--name", "dora", "--role", "editor", "--password", "short").exit_code == 2
    assert cli("users", "add", "--name", "dora", "--role", "editor", "--password", "correct horse").exit_code == 0
    assert client.post("/login", data={"user": "dora", "password": "wrong password"}).status_code == 401
    assert client.post("/login", data={"user": "nobody", "password": "correct horse"}).status_code == 401
    r = client.post("/login", data={"user": "dora", "password": "correct horse"}, follow_redirects=False)
    assert r.status_code == 303
    page = client.get("/ui/prompts").text
    assert "dora (editor)" in page
    csrf = re.search(r'"X-CSRF-Token": "([^"]+)"', page).group(1)
    r = client.post("/ui/prompts/greet/commit", data={"csrf": csrf, "text": PROMPT + "Hi.\n", "message": "by dora"})
    assert "committed" in r.text
    from tunelab.prompts import prompt_log

    assert prompt_log(ws, "greet")[0].author == "dora"
    assert client.get("/ui/keys").status_code == 403
    db = b"".join(p.read_bytes() for p in ws.state_dir.glob("tunelab.db*"))
    assert b"correct horse" not in db
    assert cli("users", "disable", "dora").exit_code == 0
    assert client.get("/ui/prompts", follow_redirects=False).status_code == 303
    assert "dora" in cli("users", "list").stdout


# -- least privilege, bounded inputs, headers (issue 18) ------------------------------------------
def test_an_app_key_calls_deployments_and_sees_only_its_own_calls(server):
    ws, client, keys = server
    _, app_key = create_key(ws, "checkout", "app")
    _, narrow = create_key(ws, "narrow", "app", deployments=["greet@*"])
    assert chat(client, keys["viewer"], content="viewer call").status_code == 200
    assert chat(client, app_key, content="app call").status_code == 200
    r = client.get("/api/logs", headers=bearer(app_key))
    assert r.status_code == 200 and [c["key_name"] for c in r.json()["calls"]] == ["checkout"]
    r = client.get("/api/logs", headers=bearer(keys["viewer"]))
    assert {c["key_name"] for c in r.json()["calls"]} == {"checkout", "viewer-key"}  # viewers read every call
    for path in ("/api/prompts", "/api/jobs"):
        assert client.get(path, headers=bearer(app_key)).status_code == 403
    assert client.post("/api/logs/export", headers=bearer(app_key), json={"name": "x"}).status_code == 403
    r = client.post("/login", data={"api_key": app_key})
    assert r.status_code == 401 and "only calls deployments" in r.text
    # a key limited to some deployments calls those only, and lists those only
    assert chat(client, narrow, model="greet@production").status_code == 200
    r = chat(client, narrow, model="fake")
    assert r.status_code == 403 and r.json()["error"]["code"] == "deployment_not_allowed"
    models = client.get("/v1/models", headers=bearer(narrow)).json()["data"]
    assert [m["id"] for m in models] == ["greet@production"]
    assert client.get("/v1/models/fake", headers=bearer(narrow)).status_code == 404


def test_a_10_mb_body_is_413_before_it_is_read(server):
    ws, client, keys = server
    big = '{"model": "fake", "messages": [{"role": "user", "content": "' + "a " * 5_000_000 + '"}]}'
    r = client.post("/v1/chat/completions", headers={**bearer(keys["viewer"]), "content-type": "application/json"},
                    content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b"x" * 600_000

    r = client.post("/v1/chat/completions", headers=bearer(keys["viewer"]), content=chunks())
    assert r.status_code == 413
    from tunelab.lifecycle.calls import list_calls

    assert list_calls(ws) == []  # nothing ran, nothing stored


def test_a_message_longer_than_the_context_is_400_before_any_compute(server):
    ws, client, keys = server
    from tunelab.models import load_model
    from tunelab.lifecycle.calls import list_calls

    model = load_model("fake", ws)
    seen = len(model.calls)
    words = " ".join(f"w{i}" for i in range(3000))  # 3,000 tokens for the fake model (context 2,048)
    for deployment in ("fake", "greet@production"):
        r = chat(client, keys["viewer"], content=words, model=deployment)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and "2048" in error["message"]
    assert len(model.calls) == seen  # the model never ran
    call = list_calls(ws)[0]
    assert call.status == "error" and call.meta["sizes"]["message_chars"] > 3000


def test_logged_bodies_are_clipped_with_the_full_size_recorded(server):
    ws, client, keys = server
    from tunelab.lifecycle.calls import LOG_TEXT_CHARS, list_calls

    text = "x" * 300_000  # one "token" for the fake model: fits its context, too long for a log
    assert chat(client, keys["viewer"], content=text, model="fake").status_code == 200
    call = list_calls(ws)[0]
    assert len(call.messages[0]["content"]) < LOG_TEXT_CHARS + 100 and len(call.output) < LOG_TEXT_CHARS + 100
    assert call.meta["clipped"] is True and call.meta["sizes"]["message_chars"] == 300_000
    assert call.meta["request_bytes"] > 300_000


@pytest.mark.parametrize("body, words", [
    ("{{ 'a'.ljust(5000000) }}", "ljust&#39; with a width"),
    ("{% for i in range(3000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}x", "longer than 2 s"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "would make"),
    ("{{ 'a'|center(99999999) }}", "width or count"),
])
def test_runaway_templates_are_stopped_with_a_clear_error(server, body, words):
    ws, client, keys = server
    csrf = login(client, keys["editor"])
    text = PROMPT.replace("{{ input }}", body)
    r = client.post("/ui/prompts/greet/render", headers={"X-CSRF-Token": csrf}, data={"text": text, "sample": "x"})
    assert r.status_code == 200 and 'class="error"' in r.text and words in r.text, r.text[:400]
    assert "template too large or too slow" in r.text


def test_a_viewer_previews_the_saved_prompt_never_posted_text(server):
    ws, client, keys = server
    csrf = login(client, keys["viewer"])
    posted = PROMPT.replace("{{ input }}", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    r = client.post("/ui/prompts/greet/render", headers={"X-CSRF-Token": csrf}, data={"text": posted, "sample": "hi there"})
    assert r.status_code == 200 and "hi there" in r.text and "error" not in r.text
    page = client.get("/ui/prompts/greet").text
    assert 'id="read-only"' in page and "readonly" in page and 'id="commit"' not in page


def test_a_template_that_never_renders_is_refused_at_commit(server, cli):
    ws, client, keys = server
    from tunelab.prompts import prompt_log

    before = len(prompt_log(ws, "greet"))
    csrf = login(client, keys["editor"])
    for body in ("{{ input.upper(1, 2) }}", "{{ 1 / 0 }}", "{{ labels[3] }}"):
        r = client.post("/ui/prompts/greet/commit", data={"csrf": csrf, "text": PROMPT.replace("{{ input }}", body),
                                                          "message": "broken"})
        assert "does not render with a sample input" in r.text, r.text
    assert len(prompt_log(ws, "greet")) == before
    assert (ws.prompts_dir / "greet.prompt").read_text() == PROMPT  # the working file was put back
    # extra fields are fine: they get placeholders
    ok = PROMPT.replace("{{ input }}", "{{ input }} for {{ customer.name }} ({{ tier }})")
    r = client.post("/ui/prompts/greet/commit", data={"csrf": csrf, "text": ok, "message": "uses fields"})
    assert "committed" in r.text
    (ws.prompts_dir / "greet.prompt").write_text(PROMPT.replace("{{ input }}", "{{ 1 / 0 }}"))
    res = cli("prompt", "commit", "greet", "-m", "broken")
    assert res.exit_code == 2 and "does not render" in res.output and "greet.prompt:6" in res.output


def test_security_headers_and_a_content_security_policy_on_every_response(server):
    ws, client, keys = server
    login(client, keys["viewer"])
    for path in ("/ui/prompts", "/ui/prompts/greet", "/login", "/static/tunelab.css"):
        r = client.get(path)
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "object-src 'none'" in csp and "frame-ancestors 'self'" in csp
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
    assert client.get("/ui/prompts").headers["cache-control"] == "no-store"  # Back never shows a stale page
    r = chat(client, keys["viewer"])
    assert "content-security-policy" in r.headers and "x-frame-options" in r.headers
    # no inline script anywhere in the console
    for path in ("/ui/prompts", "/ui/prompts/greet", "/ui/logs", "/ui/comparisons"):
        html = client.get(path).text
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), path


def test_a_forbidden_or_missing_page_is_a_page_not_json(server):
    ws, client, keys = server
    login(client, keys["viewer"])
    r = client.get("/ui/keys", headers={"accept": "text/html"})
    assert r.status_code == 403 and r.headers["content-type"].startswith("text/html")
    assert "Not allowed" in r.text and "admin role" in r.text and "viewer" in r.text
    r = client.get("/ui/prompts/nope/versions/abc123", headers={"accept": "text/html"})
    assert r.status_code == 404 and "Not found" in r.text and "<html" in r.text
    r = client.get("/ui/keys")  # an API client (no Accept: text/html) still gets JSON
    assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden"
