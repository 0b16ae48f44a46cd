"""`tunelab flow --bases A,B --search N`: prompts and fine-tunes on each base side by side (two tiny
random Llamas stand in for the bundled bases, so it runs in a minute), the fine-tunes made by a
search whose best trial is ft:NAME, and advice that names the base; bad --bases / --search input is
a one-line error, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.test_finetune import tiny_base  # noqa: F401  (fixture)
from tests.test_flow_cli import _examples, _write, labelled  # noqa: F401  (fixture)
from tunelab.flow import flow_for, run_flow


@pytest.mark.slow
def test_flow_on_two_bases_with_a_search(labelled, tiny_base, tmp_path):  # noqa: F811
    other = tmp_path / "tiny-b"
    shutil.copytree(tiny_base, other)
    flow = flow_for(labelled, bases=[str(tiny_base), str(other)], search=2, budget=2)
    lines: list[str] = []
    result = run_flow(tmp_path / "ws", flow, quick=True, log=lines.append)
    entries = {c.name: c for c in result.comparison.candidates}
    fts = [n for n in entries if n.startswith("ft:")]
    assert fts == ["ft:My-Topics-v2-ft", "ft:My-Topics-v2-ft-tiny-b"]
    assert entries[fts[0]].base == str(tiny_base) and entries[fts[1]].base == str(other)
    prompts = [c for c in entries.values() if c.kind == "prompt"]
    assert {c.base for c in prompts} == {str(tiny_base), str(other)}
    advice = result.advice
    if advice.recommendation in ("prompt", "ft", "hybrid"):  # an LLM candidate: the advice names its base
        assert advice.headline.endswith(f" on {entries[advice.candidate].base}")
    else:  # random tiny models are at chance: the advice says so, or names the classical baseline
        assert advice.headline.startswith(("No candidate is usable yet", "You may not need an LLM")), advice.headline
    from tunelab.finetune.search import search_of
    from tunelab.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    for name in fts:
        found = search_of(ws, name[3:])
        assert found is not None and len(found["trials"]) == 2
    report = json.loads(Path(result.report).parent.joinpath("report.json").read_text(encoding="utf-8"))
    assert {c["base"] for c in report["candidates"] if c["kind"] != "baseline"} == {str(tiny_base), str(other)}
    assert {c["base"] for c in report["candidates"] if c["kind"] == "baseline"} == {""}  # no base model under them
    searched = [c for c in report["candidates"] if c["search"]]
    assert [c["name"] for c in searched] == fts and all(len(c["search"]["trials"]) == 2 for c in searched)
    html = Path(result.report).read_text(encoding="utf-8")
    assert "Hyperparameter search: ft:My-Topics-v2-ft" in html


@pytest.mark.parametrize("flags, words", [
    (["--bases", "smollm2-135m,nosuch"], ["unknown base model 'nosuch'"]),
    (["--bases", "gemma3-270m,gemma3-270m"], ["lists a base twice"]),
    (["--bases", ","], ["at least one base model"]),
    (["--search", "0"], ["--search", "at least 1"]),
])
def test_bad_bases_or_search_exit_2(cli, labelled, tmp_path, flags, words):  # noqa: F811
    r = cli("flow", labelled, "--dir", tmp_path / "ws", *flags)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1
    for w in words:
        assert w in r.stderr, r.stderr
    assert not (tmp_path / "ws").exists()
