"""The web console in headless Chromium, one test per flow: edit with highlighting and variable
completion, run, commit, any-pair side-by-side diff, view and restore an old version, deploy with a
note, the call log's filters and a call's detail, the comparison's output matrix, the users page,
and a viewer's read-only views and friendly error pages.

Screenshots go to $TUNELAB_SCREENSHOTS (default: the test's tmp folder; `make screenshots` writes
the README's into docs/ui/); a failing step's screenshot path is printed."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.servers import serve_app
from tunelab.datasets import Example, save_dataset
from tunelab.files import write_atomic
from tunelab.prompts import commit_prompt, tag_prompt
from tunelab.server.app import create_app
from tunelab.server.auth import add_user, create_key

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                               "(apt-get install chromium, or make browser)")]

PROMPT = """---
model: fake
output: {type: text}
---
system:
You answer briefly.
user:
{{ input }}
"""
ROUTER = """---
model: fake:router
output: {type: label, labels: [billing, bug]}
---
user:
Which team? {{ input }}
"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("TUNELAB_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def console(workspace):
    """The served app and keys: (url, keys by name)."""
    write_atomic(workspace.prompts_dir / "greet.prompt", PROMPT)
    commit_prompt(workspace, "greet", "first version", author="alice")
    keys = {name: create_key(workspace, name, role)[1] for name, role in
            (("alice", "admin"), ("ed", "editor"), ("vic", "viewer"), ("checkout-app", "app"), ("mobile-app", "app"))}
    with serve_app(create_app(workspace)) as url:
        yield url, keys


@contextmanager
def session(browser, url: str, key: str, shots: Path, name: str):
    """A logged-in page; on failure a full-page screenshot is saved and its path printed."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error"
            and "Failed to load resource" not in msg.text else None)  # a 403 page is expected
    page.goto(f"{url}/login")
    page.fill("#api_key", key)
    page.click("#login")
    page.wait_for_url(f"{url}/ui/prompts")
    try:
        yield page
        assert not errors, errors  # no script errors, no CSP violations
    except BaseException:
        path = shots / f"failure-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        print(f"\nbrowser flow '{name}' failed; screenshot: {path}")
        raise
    finally:
        context.close()


def set_editor_text(page, text: str) -> None:
    page.evaluate("t => window.tunelabEditor.setText(document.getElementById('text'), t)", text)


def test_edit_with_highlighting_run_commit_and_diff_any_two_versions(browser, console, shots):
    from playwright.sync_api import expect

    url, keys = console
    with session(browser, url, keys["ed"], shots, "edit") as page:
        page.click("text=greet")
        page.wait_for_url(f"{url}/ui/prompts/greet")
        editor = page.locator(".cm-editor")
        expect(editor).to_be_visible()
        expect(page.locator("#text")).to_be_hidden()  # the textarea stays in the form, synced
        # highlighting: front matter keys, Jinja delimiters and the variable are separate styled tokens
        line = page.locator(".cm-line", has_text="{{ input }}")
        assert line.locator("span[class]").count() >= 2
        assert page.locator(".cm-line", has_text="model: fake").locator("span[class]").count() >= 1
        expect(page.locator("#preview")).to_contain_text("You answer briefly.")
        # type a variable: the completion offers the template's variables
        page.locator(".cm-line", has_text="{{ input }}").click()
        page.keyboard.press("End")
        page.keyboard.type(" {{ lab")
        expect(page.locator(".cm-tooltip-autocomplete")).to_contain_text("labels")
        page.keyboard.press("Escape")
        set_editor_text(page, PROMPT.replace("You answer briefly.", "You answer briefly and politely."))
        page.fill("#sample", "hello from the browser")
        expect(page.locator("#preview")).to_contain_text("briefly and politely")
        expect(page.locator("#preview")).to_contain_text("hello from the browser")
        page.screenshot(path=str(shots / "editor.png"))
        page.click("#run")
        expect(page.locator("#result .output")).to_contain_text("hello from the browser")
        page.fill("#message", "be polite")
        page.click("#commit")
        second = page.locator("#committed-version").inner_text(timeout=10_000).strip()
        expect(page.locator("#history-table tr").nth(1)).to_contain_text(second)
        expect(page.locator("#history-table tr").nth(1).locator(".current-marker")).to_have_text("current")
        set_editor_text(page, PROMPT.replace("You answer briefly.", "You answer in one short sentence."))
        page.fill("#message", "one sentence")
        page.click("#commit")
        expect(page.locator("#history-table")).to_contain_text("one sentence")
        # any two versions, side by side, changed words marked
        page.click("#compare-link")
        page.wait_for_url(f"{url}/ui/prompts/greet/diff")
        first = page.locator("#pick-a option").nth(3).get_attribute("value")
        page.select_option("#pick-a", first)  # submits itself
        page.wait_for_url(f"**/diff?a={first}*")
        table = page.locator("#side-by-side")
        expect(table.locator("del")).to_contain_text(["briefly"])
        expect(table.locator("ins").first).to_contain_text("in one short sentence")
        page.screenshot(path=str(shots / "diff.png"))
        # Back after a commit never shows a stale history (pages are not cached)
        page.goto(f"{url}/ui/prompts/greet")
        page.goto(f"{url}/ui/logs")
        page.go_back()
        expect(page.locator("#history-table")).to_contain_text("one sentence")


def test_view_restore_and_deploy_an_old_version_with_a_note(browser, console, shots, workspace):
    from playwright.sync_api import expect

    url, keys = console
    write_atomic(workspace.prompts_dir / "greet.prompt", PROMPT.replace("briefly", "at length"))
    second = commit_prompt(workspace, "greet", "verbose", author="ed")
    tag_prompt(workspace, f"greet@{second}", "production", note="try verbose")
    with session(browser, url, keys["alice"], shots, "restore") as page:
        page.goto(f"{url}/ui/prompts/greet")
        rows = page.locator("#history-table tr")
        first = rows.nth(2).locator("code").first.inner_text()
        rows.nth(2).locator("a.version-link").click()
        page.wait_for_url(f"{url}/ui/prompts/greet/versions/{first}")
        expect(page.locator(".cm-editor")).to_contain_text("You answer briefly.")
        assert page.locator(".cm-content").get_attribute("contenteditable") == "false"  # a version is read-only
        page.screenshot(path=str(shots / "version.png"))
        # roll production back to it, with a note
        page.fill("#rollback-form input[name=note]", "verbose answers confused customers")
        page.click("#deploy-version")
        expect(page.locator("h1 .tag")).to_contain_text("production")
        # restore it as the current version (a commit)
        page.once("dialog", lambda d: d.accept())
        page.click("#restore")
        page.wait_for_url(f"{url}/ui/prompts/greet")
        top = page.locator("#history-table tr").nth(1)
        expect(top).to_contain_text(f"rollback to {first}")
        expect(top.locator(".current-marker")).to_be_visible()
        deploys = page.locator("#deploys")
        expect(deploys.locator("tr").nth(1)).to_contain_text("verbose answers confused customers")
        expect(deploys.locator("tr").nth(1)).to_contain_text(second)  # moved from the verbose version
        # deploy from the history with a note and an override
        row = page.locator("#history-table tr").nth(1)
        row.locator("input[name=label]").fill("canary")
        row.locator("input[name=note]").fill("first canary")
        row.locator("summary").click()
        row.locator("input[name=allow_temperature]").check()
        row.locator("button.deploy").click()
        expect(page.locator("#deploy-notice")).to_contain_text("deployed greet@canary")
        expect(page.locator("#deploys tr").nth(1)).to_contain_text("first canary")
        expect(page.locator("#deploys tr").nth(1)).to_contain_text("temperature")
        page.screenshot(path=str(shots / "history.png"), full_page=True)


def test_call_log_filters_paging_detail_and_charts(browser, console, shots, workspace):
    from playwright.sync_api import expect

    url, keys = console
    tag_prompt(workspace, "greet@current", "production")
    for i in range(60):
        key = keys["checkout-app"] if i % 3 else keys["mobile-app"]
        r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                       json={"model": "greet@production" if i % 2 else "fake",
                             "messages": [{"role": "user", "content": f"where is parcel {4700 + i}?"}]})
        assert r.status_code == 200, r.text
    with session(browser, url, keys["vic"], shots, "logs") as page:
        page.goto(f"{url}/ui/logs")
        expect(page.locator("h1")).to_contain_text("60 calls")
        expect(page.locator("#pager")).to_contain_text("page 1 of 2")
        assert page.locator("#calls tr").count() == 51
        expect(page.locator("#charts figure")).to_have_count(2)
        assert page.locator("#charts figure").first.locator("svg.volume rect").count() >= 1
        page.screenshot(path=str(shots / "logs.png"), full_page=True)
        page.click("#older")
        expect(page.locator("#pager")).to_contain_text("page 2 of 2")
        page.select_option("#f-key", "mobile-app")
        page.select_option("#f-deployment", "greet@production")
        page.click("#apply-filters")
        expect(page.locator("h1")).to_contain_text("10 calls")
        for text in page.locator("#calls tr td:nth-child(3)").all_inner_texts():
            assert text == "mobile-app"
        page.fill("#f-text", "parcel 4703")
        page.click("#apply-filters")
        expect(page.locator("h1")).to_contain_text("1 call")
        page.locator("#calls a.call-link").first.click()
        expect(page.locator("#call-input")).to_have_text("where is parcel 4703?")
        expect(page.locator("#call-facts")).to_contain_text("mobile-app")
        page.screenshot(path=str(shots / "call.png"), full_page=True)


def test_comparison_shows_the_recommendation_and_the_output_matrix(browser, console, shots, workspace):
    from playwright.sync_api import expect

    from tunelab.compare import compare
    from tunelab.models import load_model

    url, keys = console
    write_atomic(workspace.prompts_dir / "router.prompt", ROUTER)
    write_atomic(workspace.prompts_dir / "router2.prompt", ROUTER.replace("Which team?", "Route this ticket:"))
    load_model("fake:router", workspace).rules.update({"crash": "bug", "refund": "bug"})
    examples = [Example(t, label) for t, label in [("card charged twice", "billing"), ("app crash on login", "bug"),
                                                   ("refund my card", "billing"), ("invoice for May", "billing"),
                                                   ("bug in the export", "bug")]]
    save_dataset(workspace, "tickets", {"train": examples, "validation": examples, "test": examples})
    comp = compare(workspace, "tickets:test", ["router", "router2"], progress=False)
    with session(browser, url, keys["vic"], shots, "comparison") as page:
        page.goto(f"{url}/ui/comparisons")
        page.locator("a.comparison-link").first.click()
        page.wait_for_url(f"{url}/ui/comparisons/{comp.id}")
        expect(page.locator("#recommendation")).to_contain_text(comp.recommendation.headline)
        matrix = page.locator("#matrix")
        expect(matrix.locator("tr").first).to_contain_text("router2")
        rows = matrix.locator("tr")
        assert rows.count() == 6  # a header and one row per example
        kinds = [rows.nth(i).get_attribute("class") for i in range(1, 6)]
        assert kinds == sorted(kinds, key=lambda k: k != "disagree")  # disagreements first
        page.screenshot(path=str(shots / "comparison.png"), full_page=True)


def test_users_page_and_a_viewers_read_only_views(browser, console, shots, workspace):
    from playwright.sync_api import expect

    url, keys = console
    add_user(workspace, "dora", "correct horse", "viewer")
    with session(browser, url, keys["alice"], shots, "users") as page:
        page.click("header >> text=Users")
        page.fill("#new-user", "bea")
        page.fill("#new-password", "battery staple")
        page.select_option("#new-role", "editor")
        page.click("#save-user")
        expect(page.locator("tr[data-user=bea]")).to_contain_text("active")
        page.locator("tr[data-user=dora] select").select_option("editor")  # submits itself
        expect(page.locator("tr[data-user=dora] select")).to_have_value("editor")
        page.once("dialog", lambda d: d.accept())
        page.locator("tr[data-user=bea] button", has_text="Disable").click()
        expect(page.locator("tr[data-user=bea] .state")).to_have_text("disabled")
        page.screenshot(path=str(shots / "users.png"))
    with session(browser, url, keys["vic"], shots, "viewer") as page:
        page.goto(f"{url}/ui/prompts/greet")
        expect(page.locator("#read-only")).to_be_visible()
        assert page.locator(".cm-content").get_attribute("contenteditable") == "false"
        expect(page.locator("#commit")).to_have_count(0)
        expect(page.locator("#run")).to_have_count(0)
        expect(page.locator("#preview")).to_contain_text("You answer briefly.")
        expect(page.locator("button.deploy")).to_have_count(0)
        page.screenshot(path=str(shots / "viewer.png"))
        page.goto(f"{url}/ui/keys")
        expect(page.locator("h1")).to_have_text("Not allowed")
        expect(page.locator(".error-page")).to_contain_text("admin role")
        page.screenshot(path=str(shots / "forbidden.png"))


def test_feedback_on_a_call_and_the_monitor_page(browser, console, shots, workspace):
    from playwright.sync_api import expect

    from tunelab.evaluate import evaluate, resolve_candidate
    from tunelab.lifecycle.rollouts import set_canary

    url, keys = console
    write_atomic(workspace.prompts_dir / "router.prompt", ROUTER)
    commit_prompt(workspace, "router", "first")
    tag_prompt(workspace, "router@current", "production")
    write_atomic(workspace.prompts_dir / "router.prompt", ROUTER.replace("Which team?", "Which team must act?"))
    commit_prompt(workspace, "router", "second")
    tag_prompt(workspace, "router@current", "next")
    tickets = [Example(f"my card was charged twice for order {i}", "billing") for i in range(12)]
    save_dataset(workspace, "tickets", {"train": tickets, "validation": tickets, "test": tickets})
    evaluate(workspace, resolve_candidate(workspace, "router@production"), "tickets:test", progress=False)
    set_canary(workspace, "router@production", "router@next", 0.3)
    recipes = [f"how long do I bake {food} at 180 degrees" for food in
               ("bread", "a cake", "salmon", "potatoes", "cookies", "a pie", "lasagne", "muffins", "a quiche", "pizza")]
    for i in range(30):
        text = tickets[i % 12].input if i < 10 else recipes[i % 10] + f" for {i} people?"
        r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {keys['checkout-app']}"},
                       timeout=30, json={"model": "router@production", "messages": [{"role": "user", "content": text}]})
        assert r.status_code == 200, r.text
    with session(browser, url, keys["ed"], shots, "feedback") as page:
        page.goto(f"{url}/ui/logs?deployment=router%40production")
        page.locator("#calls a.call-link").last.click()
        expect(page.locator("#no-feedback")).to_be_visible()
        page.check("#fb-wrong")
        page.fill("#fb-correction", "billing")
        page.fill("#fb-note", "a double charge")
        page.click("#fb-save")
        expect(page.locator("#feedback-message")).to_have_text("feedback saved")
        expect(page.locator("#feedback-history")).to_contain_text("a double charge")
        page.goto(f"{url}/ui/monitor")
        expect(page.locator("#deployments")).to_contain_text("router@next (30%)")
        page.click("text=router@production")
        expect(page.locator("#alarms .alarm").first).to_be_visible()
        expect(page.locator("#alarms")).to_contain_text("what to do")
        assert page.locator("#drift-charts svg polyline").count() >= 3
        expect(page.locator("#arms tr[data-arm=canary]")).to_contain_text("router@next")
        page.screenshot(path=str(shots / "monitor.png"), full_page=True)
