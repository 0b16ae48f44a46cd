"""The flow (`tunelab demo` is the flow on the bundled data), and that running it again reuses the finished work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tunelab.flow import SHORT_PROMPT_TEXT, _ensure_prompt, examples_dir, run_demo


def test_demo_data_and_prompts_are_valid(workspace):
    from tunelab.datasets import check_path
    from tunelab.prompts import load_prompt, parse_prompt

    report, splits = check_path(examples_dir())
    assert report.ok and set(splits) == {"train", "validation", "test"}
    labels = sorted({ex.output for ex in splits["train"]})
    short = parse_prompt(SHORT_PROMPT_TEXT, "support-short")
    bundled = parse_prompt((examples_dir() / "support-router.prompt").read_text(), "support-router")
    assert sorted(short.output.labels) == sorted(bundled.output.labels) == labels

    ref = _ensure_prompt(workspace, "support-short", SHORT_PROMPT_TEXT)
    assert _ensure_prompt(workspace, "support-short", SHORT_PROMPT_TEXT) == ref  # idempotent
    assert load_prompt(workspace, ref).version == short.version


def test_subsample_is_stratified_seeded_and_in_order():
    from tunelab.datasets import Example, subsample

    exs = [Example(f"x{i}", "ab"[i % 3 == 0]) for i in range(30)]
    sub = subsample(exs, 10)
    assert len(sub) == 10 and sub == subsample(exs, 10)
    assert sum(e.output == "b" for e in sub) == 5  # labels in turn: each gets its share while both last
    assert [exs.index(e) for e in sub] == sorted(exs.index(e) for e in sub)  # the examples keep their order
    assert subsample(exs, 10, seed=1) != sub and subsample(exs, 100) == exs


@pytest.mark.realmodel
@pytest.mark.slow
def test_quick_demo_end_to_end_and_resumable(tmp_path, monkeypatch):
    from tunelab.store.models import FineTuneRow, RunRow
    from tunelab.workspace import Workspace

    monkeypatch.delenv("TUNELAB_WORKSPACE", raising=False)
    monkeypatch.delenv("TUNELAB_DATABASE_URL", raising=False)
    lines: list[str] = []
    out = run_demo(tmp_path / "demo", quick=True, volume=50_000, log=lines.append)
    comp = out.comparison.to_json()
    kinds = [c["kind"] for c in comp["candidates"]]
    assert kinds[0] == "prompt" and kinds[-5:] == ["ft", "hybrid", "baseline", "baseline", "baseline"]
    assert all(c["metric"]["value"] is not None for c in comp["candidates"])
    assert out.advice.recommendation in ("prompt", "ft", "hybrid", "baseline", "none")
    assert out.advice.reasons
    # never a recommendation over chance-level candidates (16 test examples, 8 labels, a few training steps)
    from tunelab.compare.advise import chance_level

    level, _ = chance_level(out.comparison)
    if out.advice.recommendation != "none":
        chosen = out.comparison.entry(out.advice.candidate)
        assert chosen.metric.low > level, out.advice.headline
    else:
        assert out.advice.headline.startswith(("No candidate is usable yet", "Neither"))
    # the learning curves that fit the quick budget: the baselines (seconds), with the crossover or its absence
    curve = out.comparison.learning_curve
    assert {s.kind for s in curve.series} >= {"baseline"} and curve.crossover is not None
    report = Path(out.report)
    assert report.is_file() and json.loads((report.parent / "report.json").read_text())["id"] == comp["id"]
    assert any(line.startswith("[7/7] advice") for line in [s.strip() for s in lines])
    hybrid = next(c for c in comp["candidates"] if c["kind"] == "hybrid")
    assert hybrid["routing"] is not None and hybrid["routing"]["primary"] + hybrid["routing"]["fallback"] == pytest.approx(1)

    ws = Workspace(tmp_path / "demo")
    with ws.store.session() as s:
        runs = s.scalar(select(func.count()).select_from(RunRow))
        fts = s.scalar(select(func.count()).select_from(FineTuneRow))
    lines.clear()
    again = run_demo(tmp_path / "demo", quick=True, volume=50_000, log=lines.append)
    with ws.store.session() as s:
        assert s.scalar(select(func.count()).select_from(RunRow)) == runs
        assert s.scalar(select(func.count()).select_from(FineTuneRow)) == fts
    assert all(c.reused_run for c in again.comparison.candidates)
    assert any("reusing fine-tune" in line for line in lines) and any("reusing optimization" in line for line in lines)
    assert [c.metric for c in again.comparison.candidates] == [c.metric for c in out.comparison.candidates]
