"""`tunelab flow DATA_DIR`: the demo's whole flow on a user's own labelled folder (tunelab.flow.flow_for)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.flow import flow_for, flow_name

# A tiny labelled dataset written for these tests: 3 labels x 16 distinct sentences.
_TOPICS = {
    "weather": (["It will rain", "Heavy snow is expected", "A warm sunny spell comes", "Strong winds blow"],
                ["over the hills tomorrow", "in the city this weekend", "along the coast tonight", "across the north on Monday"]),
    "sports": (["The home team won the cup final", "Our striker scored twice", "The tennis champion lost a set",
                "The cycling race was decided"], ["after a long season", "in front of a loud crowd",
                                                  "despite a late injury", "in the last minute"]),
    "food": (["This lentil soup needs more salt", "Bake the bread dough", "The lemon cake tasted great",
              "Grill the peppers"], ["with fresh herbs from the garden", "for about forty minutes",
                                     "at the small bakery downtown", "before the guests arrive"]),
}


def _examples() -> dict[str, list[dict]]:
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for label, (subjects, tails) in _TOPICS.items():
        rows = [{"input": f"{s} {t}.", "output": label} for s in subjects for t in tails]
        splits["train"] += rows[:8]
        splits["validation"] += rows[8:12]
        splits["test"] += rows[12:]
    return splits


def _write(folder: Path, splits: dict[str, list[dict]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


@pytest.fixture
def labelled(tmp_path) -> Path:
    return _write(tmp_path / "My Topics (v2)", _examples())


def test_flow_for_reads_the_labels_and_names_everything_after_the_folder(labelled):
    from tunelab.prompts import parse_prompt

    flow = flow_for(labelled, task="What is this sentence about?", field="Sentence", epochs=2, budget=3)
    assert flow.dataset == "My-Topics-v2"
    assert (flow.base_prompt, flow.short_prompt, flow.finetune, flow.hybrid) == (
        "My-Topics-v2-zero-shot", "My-Topics-v2-short", "My-Topics-v2-ft", "My-Topics-v2-hybrid")
    assert flow.data_dir == labelled and flow.finetune_settings["epochs"] == 2 and flow.optimize_budget == 3
    base = parse_prompt(flow.base_prompt_text, flow.base_prompt)
    short = parse_prompt(flow.short_prompt_text, flow.short_prompt)
    assert base.output.type == short.output.type == "label"
    assert base.output.labels == short.output.labels == ["food", "sports", "weather"]
    assert "What is this sentence about?" in flow.base_prompt_text
    assert "Sentence: {{ input }}" in flow.short_prompt_text and "Label this sentence." in flow.short_prompt_text
    rendered = base.render(_example("Rain again."))
    text = rendered[-1]["content"]
    assert "food, sports, weather" in text and "Sentence: Rain again." in text


def _example(text: str):
    from tunelab.datasets import Example

    return Example(text, "")


def test_flow_for_keeps_labels_yaml_would_misread_as_strings(tmp_path):
    from tunelab.prompts import parse_prompt

    splits = {s: [{"input": f"{s} question {i}", "output": ["yes", "no", "1"][i % 3]} for i in range(9)]
              for s in ("train", "validation", "test")}
    flow = flow_for(_write(tmp_path / "yn", splits))
    assert parse_prompt(flow.base_prompt_text, flow.base_prompt).output.labels == ["1", "no", "yes"]


@pytest.mark.parametrize("raw, name", [("sms_spam", "sms_spam"), ("My Topics (v2)", "My-Topics-v2"),
                                       ("--x", "x"), ("..", "data"), ("é" * 3, "data"), ("a" * 200, "a" * 80)])
def test_flow_name_follows_the_naming_rules(raw, name):
    from tunelab.datasets import validate_name

    assert flow_name(raw) == name
    validate_name(flow_name(raw) + "-zero-shot", "prompt")


def test_bench_full_flow_builds_its_flow_with_the_factory():
    text = (Path(__file__).resolve().parents[1] / "bench" / "full_flow.py").read_text(encoding="utf-8")
    assert "flow_for(" in text and "def prompts_for" not in text


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert "\n" not in err and err.startswith("error:") and "Traceback" not in result.output, err
    for needle in needles:
        assert needle in err, err
    return err


def test_cli_missing_folder_and_no_train_data(cli, tmp_path):
    _one_line_error(cli("flow", tmp_path / "nope"), "nope", "does not exist", "a train file")
    splits = _examples()
    del splits["train"]
    folder = _write(tmp_path / "evalonly", splits)
    _one_line_error(cli("flow", folder), "evalonly", "has no train file")
    assert not (tmp_path / "tunelab-flow-evalonly").exists()


def _imported(tmp_path, source: Path, quick: bool = False):
    from tunelab.datasets import get_dataset
    from tunelab.flow import _import_data
    from tunelab.workspace import Workspace

    flow = flow_for(source)
    ws = Workspace.init(tmp_path / f"ws-{source.name}-{quick}")
    logged: list[str] = []
    ref = _import_data(ws, flow, quick, logged.append)
    return flow, get_dataset(ws, ref), logged


def _rows(ds, split):
    return [(ex.input, ex.output) for ex in ds.splits[split]]


def test_a_single_data_file_is_split_into_train_validation_and_test(tmp_path):
    rows = [r for split in _examples().values() for r in split]
    path = tmp_path / "Support Tickets.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    flow, ds, logged = _imported(tmp_path, path)
    assert flow.dataset == "Support-Tickets" and flow.data_dir == path
    assert set(ds.splits) == {"train", "validation", "test"} and all(ds.splits.values())
    every = _rows(ds, "train") + _rows(ds, "validation") + _rows(ds, "test")
    assert sorted(every) == sorted((r["input"], r["output"]) for r in rows)  # nothing lost, nothing twice
    assert {o for _, o in _rows(ds, "test")} == set(_TOPICS)  # stratified: every label in test
    assert any("split off train" in line for line in logged)
    _, again, _ = _imported(tmp_path / "again", path)  # seeded: the same split every time
    assert _rows(again, "test") == _rows(ds, "test")


def test_a_folder_with_train_and_test_gets_a_validation_split(tmp_path):
    splits = _examples()
    del splits["validation"]
    folder = _write(tmp_path / "partial", splits)
    _, ds, _ = _imported(tmp_path, folder)
    assert _rows(ds, "test") == [(r["input"], r["output"]) for r in splits["test"]]  # the user's test split kept
    assert ds.splits["validation"] and len(ds.splits["train"]) + len(ds.splits["validation"]) == len(splits["train"])
    _, small, _ = _imported(tmp_path, folder, quick=True)
    assert set(small.splits) == {"train", "validation", "test"} and all(small.splits.values())


def test_free_text_and_long_outputs_make_a_text_flow(tmp_path):
    """Many distinct or long outputs are free text now (tests/test_flow_generative.py runs those flows)."""
    from tunelab.flow import flow_for

    splits = {s: [{"input": f"question {i} of {s}", "output": f"a long free answer number {i} about {s}"}
                  for i in range(60)] for s in ("train", "validation", "test")}
    assert flow_for(_write(tmp_path / "answers", splits)).output_type == "text"
    splits = {s: [{"input": f"{s} text {i}", "output": "x" * 80 if i % 2 else "short"} for i in range(6)]
              for s in ("train", "validation", "test")}
    assert flow_for(_write(tmp_path / "long", splits)).output_type == "text"


def test_flow_head_field_for_label_tasks_only(cli, labelled, tmp_path):
    """`--head classify` (the Flow's `head`): label tasks fine-tune NAME-ft-head beside NAME-ft; other
    outputs and unknown heads are one-line errors."""
    assert flow_for(labelled, head="classify").head == "classify" and flow_for(labelled).head is None
    splits = {s: [{"input": f"question {i} of {s}", "output": f"a long free answer number {i} about {s}"}
                  for i in range(60)] for s in ("train", "validation", "test")}
    _one_line_error(cli("flow", _write(tmp_path / "answers", splits), "--head", "classify"), "label outputs")
    _one_line_error(cli("flow", labelled, "--head", "regress"), "unknown head 'regress'")


def test_flow_minutes_must_be_above_zero(cli, labelled, tmp_path):
    """`--minutes` (the flow's time budget) is checked before any work: a one-line error, exit 2."""
    _one_line_error(cli("flow", labelled, "--dir", str(tmp_path / "ws"), "--minutes", "0"),
                    "--minutes must be a number of minutes above 0")
    assert not (tmp_path / "ws").exists()


def test_cli_a_single_label(cli, tmp_path):
    splits = {s: [{"input": f"{s} text {i}", "output": "same"} for i in range(6)] for s in ("train", "validation", "test")}
    _one_line_error(cli("flow", _write(tmp_path / "one", splits)), "every train output is 'same'")


@pytest.mark.realmodel
@pytest.mark.slow
def test_quick_flow_on_a_users_folder_end_to_end(cli, labelled, tmp_path, monkeypatch):
    monkeypatch.delenv("TUNELAB_WORKSPACE", raising=False)
    monkeypatch.delenv("TUNELAB_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    result = cli("flow", labelled, "--quick", "--field", "Sentence", "--volume", "20000", "--head", "classify")
    assert result.exit_code == 0, result.output
    ws = tmp_path / "tunelab-flow-My-Topics-v2"
    assert (ws / "tunelab.yaml").is_file()
    report = Path(next(line.split("report:", 1)[1].strip() for line in result.stderr.splitlines()
                       if line.startswith("report:")))
    assert report.is_file() and report.suffix == ".html" and ws.resolve() in report.resolve().parents
    comparison = json.loads((report.parent / "report.json").read_text(encoding="utf-8"))
    names = [c["name"] for c in comparison["candidates"]]
    kinds = [c["kind"] for c in comparison["candidates"]]
    assert names[0].startswith("My-Topics-v2-zero-shot@") and kinds[0] == "prompt"
    assert names[-6:-3] == ["ft:My-Topics-v2-ft", "ft:My-Topics-v2-ft-head", "hybrid:My-Topics-v2-hybrid"]
    assert kinds[-6:-3] == ["ft", "ft", "hybrid"]  # the generative fine-tune and the one with a head (--head classify)
    assert [n.split(":")[1] for n in names[-3:]] == ["majority", "tfidf", "embed"]  # the classical reference rows
    assert all(c["metric"]["value"] is not None for c in comparison["candidates"])
    assert "[7/7] advice" in result.stderr


def _generative(kind: str) -> dict[str, list[dict]]:
    """Booking messages with their slots as JSON (a quarter with none), or place notes to describe
    in a sentence (two references each): every output distinct enough to be no label."""
    rows = []
    for i in range(60):
        place, when, n = ["the harbour", "the old mill", "the market"][i % 3], ["7pm", "8pm", "noon"][i % 3], 2 + i
        if kind == "json":
            pick = i % 4
            text = [f"hello, are you open on day {i}?", f"a table for {n} people please", f"book us at {when}",
                    f"a table for {n} at {when}"][pick]
            slots = [{}, {"people": n}, {"time": when}, {"people": n, "time": when}][pick]
            rows.append({"input": text, "output": json.dumps(slots)})
        else:
            out = f"{place.capitalize()} had {n} visitors at {when}."
            rows.append({"input": f"place: {place} | time: {when} | visitors: {n}", "output": out,
                         "meta": {"refs": [out, f"At {when}, {place} saw {n} visitors."]}})
    return {"train": rows[:40], "validation": rows[40:50], "test": rows[50:]}


@pytest.mark.realmodel
@pytest.mark.slow
@pytest.mark.parametrize("kind,metric,refs", [("json", "field_f1", ["majority", "nearest"]),
                                              ("text", "chrf", ["copy", "nearest"])])
def test_quick_json_and_text_flows_end_to_end_with_their_classical_reference(cli, tmp_path, monkeypatch, kind, metric,
                                                                           refs):
    monkeypatch.delenv("TUNELAB_WORKSPACE", raising=False)
    monkeypatch.delenv("TUNELAB_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    folder = _write(tmp_path / f"gen-{kind}", _generative(kind))
    result = cli("flow", str(folder), "--quick", "--task", "Extract the booking's slots" if kind == "json"
                 else "Describe the place in one sentence")
    assert result.exit_code == 0, result.output
    report = Path(next(line.split("report:", 1)[1].strip() for line in result.stderr.splitlines()
                       if line.startswith("report:")))
    comparison = json.loads((report.parent / "report.json").read_text(encoding="utf-8"))
    assert comparison["output_type"] == kind and comparison["metric"] == metric
    names = [c["name"] for c in comparison["candidates"]]
    assert [n.split(":")[1] for n in names if n.startswith("baseline:")] == refs  # the classical reference rows
    assert names[0].startswith(f"gen-{kind}-zero-shot@") and f"hybrid:gen-{kind}-hybrid" in names
    assert all(c["metric"]["value"] is not None for c in comparison["candidates"])
    nearest = next(c for c in comparison["candidates"] if c["name"].startswith("baseline:nearest"))
    assert nearest["metric"]["value"] > 0.2  # the most similar train input's output shares most of the answer
    curve = comparison["learning_curve"]
    assert any(s["candidate"] == nearest["name"] and len(s["points"]) == 4 for s in curve["series"])
    assert "[7/7] advice" in result.stderr
