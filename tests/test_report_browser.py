"""The HTML report: self-contained, every plot rendered, no script errors (headless Chromium)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tunelab.compare import (SCHEMA, CandidateEntry, Comparison, advise, break_even_pairs, horizon_cost, render_html,
                             table_rows, write_report)

CHROMIUM = Path("/usr/bin/chromium")


def _cand(name, kind, value, setup, per_req, *, lat=0.05, confusion=True, curves=False, routing=None):
    labels = ["billing", "bug", "other"]
    c = {
        "name": name, "kind": kind, "model": "smollm2-135m", "local": True, "run_id": f"r-{kind}",
        "reused_run": False, "n": 120, "eval_wall_s": 12.0,
        "metric": {"value": value, "low": value - 0.06, "high": min(1.0, value + 0.05)},
        "metrics": {"accuracy": {"value": value, "low": value - 0.06, "high": value + 0.05}},
        "vs_best": None,
        "consistency": {"repeat": 3, "agreement": 0.97, "pass_k": value - 0.02, "format_validity": 1.0},
        "tokens": {"prompt": 310.0 if kind == "prompt" else 60.0, "completion": 2.0, "total": 312.0 if kind == "prompt" else 62.0},
        "latency": {"p50": lat, "p95": lat * 1.8, "mean": lat * 1.1, "throughput_per_s": 1 / lat,
                    "samples": [lat * (0.7 + 0.01 * i) for i in range(120)]},
        "setup": {"wall_s": 600.0 if kind != "prompt" else 120.0, "compute_cost": setup, "engineer_hours": 0.0,
                  "engineer_cost": 0.0, "total_cost": setup, "tokens": 1000, "sources": [f"{kind} setup"]},
        "cost_per_request": per_req, "cost_per_1k": per_req * 1000, "cost_horizon": horizon_cost(setup, per_req, 50_000),
        "flexibility": {"change_s": 30.0 if kind == "prompt" else 900.0, "how": "prompt edit + re-evaluation"},
        "confusion": {"labels": labels, "matrix": [[30, 5, 5], [4, 33, 3], [2, 2, 36]]} if confusion else None,
        "training_curves": {"train_loss": [[i, 2.0 / (i + 1)] for i in range(1, 30)], "val_loss": [[1, 0.9], [2, 0.7]],
                            "val_metric": [[1, 0.8], [2, 0.86]]} if curves else None,
        "routing": routing, "examples_trained": 900 if kind != "prompt" else None,
    }
    return c


def sample_comparison() -> Comparison:
    cands = [
        _cand("support-router@1a2b", "prompt", 0.78, 0.0, 0.00003, lat=0.09),
        _cand("ft:support", "ft", 0.88, 0.02, 0.00001, lat=0.03, curves=True),
        _cand("hybrid:support", "hybrid", 0.90, 0.02, 0.000015, lat=0.04,
              routing={"primary": 0.82, "fallback": 0.18, "reasons": {"unsure": 0.12, "out_of_distribution": 0.04, "rule": 0.02}}),
    ]
    cands[0]["vs_best"] = {"other": "hybrid:support", "test": "mcnemar", "p_value": 0.0004, "difference": -0.12, "significant": True}
    cands[1]["vs_best"] = {"other": "hybrid:support", "test": "mcnemar", "p_value": 0.31, "difference": -0.02, "significant": False}
    comp = {
        "schema": SCHEMA, "id": "cmp-test", "created_at": "2025-01-01T00:00:00",
        "dataset": {"name": "support", "version": "abc", "split": "test", "n_examples": 120, "labels": ["billing", "bug", "other"]},
        "metric": "accuracy", "volume_per_month": 50_000, "months": 12, "engineer_hourly_rate": 0.0, "best": "hybrid:support",
        "candidates": cands,
        "pairwise": [{"a": "hybrid:support", "b": "support-router@1a2b", "test": "mcnemar", "p_value": 0.0004, "difference": 0.12, "significant": True},
                     {"a": "hybrid:support", "b": "ft:support", "test": "mcnemar", "p_value": 0.31, "difference": 0.02, "significant": False},
                     {"a": "ft:support", "b": "support-router@1a2b", "test": "mcnemar", "p_value": 0.002, "difference": 0.10, "significant": True}],
        "break_even": [b.model_dump() for b in break_even_pairs([CandidateEntry.model_validate(c) for c in cands],
                                                                 50_000)],
        "learning_curve": {"candidate": "ft:support", "metric": "accuracy", "points": [
            {"fraction": f, "n_train": int(900 * f), "candidate": f"ft:support-lc{int(f * 100)}",
             "metric": {"value": v, "low": v - 0.07, "high": v + 0.06}, "wall_s": 60 * f}
            for f, v in [(0.1, 0.55), (0.25, 0.7), (0.5, 0.82), (1.0, 0.88)]]},
    }
    comparison = Comparison.model_validate(comp)
    comparison.recommendation = advise(comparison)
    return comparison


def test_table_has_every_aspect():
    header, rows = table_rows(sample_comparison())
    assert header == ["aspect", "support-router@1a2b", "ft:support", "hybrid:support"]
    aspects = " | ".join(r[0] for r in rows)
    for word in ("accuracy", "paired test", "consistency", "tokens", "latency", "throughput", "setup time",
                 "setup cost", "1,000 requests", "12 months", "change behaviour", "training examples", "traffic share"):
        assert word in aspects
    assert all(len(r) == len(header) for r in rows)


def test_html_is_self_contained(tmp_path):
    comp = sample_comparison()
    html_path, json_path = write_report(comp, tmp_path / "report.html")
    html = html_path.read_text()
    assert json.loads(json_path.read_text())["id"] == "cmp-test"
    # nothing loaded from elsewhere: every src/href is a data: URL or an in-page anchor
    for attr in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert attr.startswith(("data:", "#")), attr
    assert "<script" not in html.lower() or "src=" not in html.lower().split("<script", 1)[1].split(">", 1)[0]
    imgs = re.findall(r'<img src="data:image/png;base64,', html)
    # metric, cost, latency, routing, learning curve, 3 confusion matrices, 1 training curve
    assert len(imgs) == 9
    assert "Recommendation" in html and "break-even" in html.lower()


def test_report_without_optional_parts(tmp_path):
    comp = sample_comparison()
    for c in comp.candidates:
        c.confusion = c.training_curves = c.routing = None
    comp.learning_curve = None
    comp.recommendation = None
    html = render_html(comp)
    assert len(re.findall(r"<img ", html)) == 3  # metric, cost, latency


@pytest.mark.browser
def test_report_renders_in_chromium(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent: run 'make browser' (apt-get install chromium) to run this test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    html_path, _ = write_report(sample_comparison(), tmp_path / "report.html")

    errors: list[str] = []
    failed: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html_path.as_uri(), wait_until="load")
            sizes = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.alt, e.complete, e.naturalWidth, e.naturalHeight])")
            title = page.title()
            rec = page.inner_text("#recommendation")
        finally:
            browser.close()
    assert len(sizes) == 9
    broken = [s for s in sizes if not (s[1] and s[2] > 0 and s[3] > 0)]
    assert not broken, f"plots that did not render: {broken}"
    assert not errors, errors
    assert not failed, failed
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert "support" in title
    assert "Recommendation" in rec
