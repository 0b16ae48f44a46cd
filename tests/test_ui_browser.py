"""The web UI in headless Chromium: log in, edit a prompt, run it, commit, see history and diff,
deploy, call the gateway with a key, and find the call in the logs. Screenshots go to
$TUNELAB_SCREENSHOTS (default: the test's tmp folder) and their paths are printed on failure."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.servers import serve_app
from tunelab.prompts import commit_prompt
from tunelab.files import write_atomic
from tunelab.server.app import create_app
from tunelab.server.auth import create_key

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


def test_edit_run_commit_diff_deploy_call_and_find_the_call_in_the_logs(workspace, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    write_atomic(workspace.prompts_dir / "greet.prompt", PROMPT)
    first = commit_prompt(workspace, "greet", "first version")
    _, admin_key = create_key(workspace, "alice", "admin")
    _, app_key = create_key(workspace, "checkout-app", "viewer")
    shots = Path(os.environ.get("TUNELAB_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []

    with serve_app(create_app(workspace)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        page = browser.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        step = "start"
        try:
            step = "log in"
            page.goto(f"{url}/login")
            page.fill("#api_key", admin_key)
            page.click("#login")
            page.wait_for_url(f"{url}/ui/prompts")
            expect(page.locator("header")).to_contain_text("alice (admin)")

            step = "open the editor; the preview renders live"
            page.click("text=greet")
            page.wait_for_url(f"{url}/ui/prompts/greet")
            expect(page.locator("#preview")).to_contain_text("You answer briefly.")
            edited = PROMPT.replace("You answer briefly.", "You answer briefly and politely.")
            page.fill("#text", edited)
            page.fill("#sample", "hello from the browser")
            expect(page.locator("#preview")).to_contain_text("briefly and politely")
            expect(page.locator("#preview")).to_contain_text("hello from the browser")
            page.screenshot(path=str(shots / "1-editor.png"))

            step = "run it on an example (the playground)"
            page.click("#run")
            expect(page.locator("#result .output")).to_contain_text("hello from the browser")

            step = "commit"
            page.fill("#message", "be polite")
            page.click("#commit")
            version = page.locator("#committed-version").inner_text(timeout=10_000).strip()
            assert version and version != first
            expect(page.locator("#history-table")).to_contain_text("be polite")
            expect(page.locator("#history-table tr").nth(1)).to_contain_text(version)

            step = "see the diff"
            page.locator("#history-table tr").nth(1).locator("a.diff-link").click()
            expect(page.locator("pre.diff")).to_contain_text("+You answer briefly and politely.")
            expect(page.locator("pre.diff")).to_contain_text("-You answer briefly.")
            page.screenshot(path=str(shots / "2-diff.png"))
            page.goto(f"{url}/ui/prompts/greet")

            step = "deploy (tag production)"
            row = page.locator("#history-table tr").nth(1)
            row.locator("input[name=label]").fill("production")
            row.locator("button.deploy").click()
            expect(page.locator("#history-table tr").nth(1).locator(".tag")).to_contain_text("production")

            step = "call the gateway with a key"
            r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {app_key}"},
                           json={"model": "greet@production",
                                 "messages": [{"role": "user", "content": "where is my parcel 4711?"}]}, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["tunelab"]["prompt_version"] == version

            step = "find the call in the logs"
            page.goto(f"{url}/ui/logs")
            first_row = page.locator("#calls tr").nth(1)
            expect(first_row).to_contain_text("where is my parcel 4711?")
            expect(first_row).to_contain_text("checkout-app")
            expect(first_row).to_contain_text("greet@production")
            expect(first_row).to_contain_text(version)
            page.screenshot(path=str(shots / "3-logs.png"))
            assert app_key[3:] not in page.content() and admin_key[3:] not in page.content()
            assert not errors, errors
        except BaseException:
            path = shots / "failure.png"
            try:
                page.screenshot(path=str(path), full_page=True)
                print(f"\nbrowser test failed at step '{step}'; screenshot: {path}")
            except Exception as exc:  # noqa: BLE001
                print(f"\nbrowser test failed at step '{step}'; no screenshot ({exc})")
            raise
        finally:
            browser.close()


def test_the_comparisons_page_shows_each_recommendation(workspace, tmp_path):
    """A comparison made with `compare()` (typed result, advice inside) is listed with its
    recommendation's headline, and its report opens."""
    from playwright.sync_api import expect, sync_playwright

    from tunelab.compare import compare
    from tunelab.datasets import Example, save_dataset

    label_prompt = PROMPT.replace("output: {type: text}", "output: {type: label, labels: [spam, ham]}")
    write_atomic(workspace.prompts_dir / "sms.prompt", label_prompt)
    examples = [Example(w, w) for w in ("spam", "ham", "spam", "ham", "hello")]
    save_dataset(workspace, "sms", {"train": examples, "validation": examples, "test": examples})
    comp = compare(workspace, "sms:test", ["sms"], progress=False)
    assert comp.recommendation is not None and comp.recommendation.candidate.startswith("sms@")
    _, viewer = create_key(workspace, "vic", "viewer")
    shots = Path(os.environ.get("TUNELAB_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with serve_app(create_app(workspace)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(f"{url}/login")
            page.fill("#api_key", viewer)
            page.click("#login")
            page.wait_for_url(f"{url}/ui/prompts")
            page.goto(f"{url}/ui/comparisons")
            row = page.locator("#comparisons tr").nth(1)
            expect(row.locator(".recommendation")).to_contain_text(comp.recommendation.headline)
            expect(row).to_contain_text(comp.id)
            page.screenshot(path=str(shots / "comparisons.png"))
            with page.expect_popup() as popup:
                row.locator(f"a[href='/ui/comparisons/{comp.id}/report']").click()
            report = popup.value
            expect(report.locator("#recommendation")).to_contain_text(comp.recommendation.headline)
        finally:
            browser.close()
