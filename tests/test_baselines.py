"""Classical baselines as candidates: trained once on the train split, evaluated by the one
evaluator, resolved by name like every candidate, shown in label comparisons as reference rows."""

from __future__ import annotations

import pytest

from tunelab.compare import compare
from tunelab.datasets import Example, get_dataset, save_dataset
from tunelab.errors import UserError
from tunelab.evaluate import evaluate, parse_baseline, resolve_candidate, run_rows

WORDS = {"billing": ["invoice", "refund", "charge", "payment"], "bug": ["crash", "freeze", "error", "broken"],
         "account": ["password", "login", "email", "username"]}


def _examples(n: int, seed: int, skew: str | None = None) -> list[Example]:
    out = []
    labels = sorted(WORDS)
    seen = dict.fromkeys(WORDS, seed)
    for i in range(n):
        label = skew if skew and i % 2 == 0 else labels[i % len(labels)]
        word = WORDS[label][seen[label] % 4]  # every word of each label in turn
        seen[label] += 1
        out.append(Example(f"ticket {seed}-{i}: my {word} is a problem today", label))
    return out


@pytest.fixture
def ws(workspace):
    save_dataset(workspace, "tickets", {"train": _examples(60, 0, skew="bug"), "validation": _examples(12, 1),
                                        "test": _examples(30, 2)})
    return workspace


def test_names_parse_and_bad_names_are_one_line_errors():
    assert parse_baseline("baseline:tfidf") == ("tfidf", None, None)
    assert parse_baseline("baseline:embed-n25:tickets@abc123") == ("embed", 25, "tickets@abc123")
    for bad in ("baseline:svm", "baseline:tfidf:../x", "baseline:tfidf-n0", "baseline:"):
        with pytest.raises(UserError) as err:
            parse_baseline(bad)
        assert "\n" not in str(err.value)


def test_tfidf_baseline_learns_the_task_and_majority_is_the_floor(ws):
    ds = get_dataset(ws, "tickets")
    tfidf = resolve_candidate(ws, "baseline:tfidf", data="tickets:test")
    assert tfidf.name == f"baseline:tfidf:tickets@{ds.version}" and tfidf.kind == "baseline"
    assert tfidf.output.type == "label" and set(tfidf.output.labels) == set(WORDS)
    result = evaluate(ws, tfidf, "tickets:test", progress=False)
    assert result.metrics["accuracy"]["value"] >= 0.9  # the words give the label away
    rows = run_rows(ws, result.id)
    assert all(r.prediction in WORDS for r in rows)

    majority = resolve_candidate(ws, f"baseline:majority:tickets@{ds.version}")
    answers = majority.predict([Example("anything at all", "")])
    assert answers[0].text == "bug"  # half the train split is bug
    scores = answers[0].label_logprobs
    assert max(scores, key=scores.get) == "bug" and scores["bug"] > scores["billing"]
    share = sum(ex.output == "bug" for ex in ds.split("test")) / len(ds.split("test"))
    m = evaluate(ws, majority, "tickets:test", progress=False)
    assert m.metrics["accuracy"]["value"] == pytest.approx(share)


def test_a_trained_baseline_is_stored_and_reused_with_its_setup_cost(ws):
    first = resolve_candidate(ws, "baseline:tfidf:tickets")
    path = ws.artifacts_dir / "baselines" / f"tickets@{get_dataset(ws, 'tickets').version}" / "tfidf.joblib"
    assert path.is_file()
    mtime = path.stat().st_mtime_ns
    again = resolve_candidate(ws, "baseline:tfidf:tickets")
    assert path.stat().st_mtime_ns == mtime  # loaded, not retrained
    assert again.fingerprint == first.fingerprint and again.setup.wall_s == first.setup.wall_s
    assert first.setup.how == "baseline" and first.setup.examples == 60 and first.setup.wall_s > 0
    small = resolve_candidate(ws, "baseline:tfidf-n15:tickets")
    assert small.setup.examples == 15 and small.fingerprint != first.fingerprint
    assert {c.text for c in small.predict(_examples(6, 3))} <= set(WORDS)


def test_skewed_labels_choose_class_weights_by_cross_validation_balanced_ones_do_not(ws):
    from tunelab.datasets.check import SKEWED_SHARE
    from tunelab.evaluate.baselines import train_baseline

    train = get_dataset(ws, "tickets").split("train")
    assert max(sum(ex.output == lab for ex in train) for lab in WORDS) / len(train) >= SKEWED_SHARE  # the fixture is skewed
    skewed = train_baseline(ws, "tfidf", "tickets")
    assert skewed["class_weight"] in (None, "balanced") and set(skewed["cv_macro_f1"]) == {"none", "balanced"}
    best = max(skewed["cv_macro_f1"], key=lambda k: skewed["cv_macro_f1"][k])  # the CV's choice is stored
    assert (skewed["class_weight"] or "none") == best or len(set(skewed["cv_macro_f1"].values())) == 1
    cand = resolve_candidate(ws, "baseline:tfidf:tickets")
    assert "3-fold CV macro-F1" in cand.setup.sources[0]
    save_dataset(ws, "even", {"train": _examples(60, 7), "test": _examples(12, 8)})  # balanced: no CV, no weights
    even = train_baseline(ws, "tfidf", "even")
    assert even["class_weight"] is None and even["cv_macro_f1"] is None
    assert "CV" not in resolve_candidate(ws, "baseline:tfidf:even").setup.sources[0]
    assert train_baseline(ws, "majority", "tickets")["cv_macro_f1"] is None  # nothing to weigh


def test_a_baseline_needs_to_know_its_data(ws):
    save_dataset(ws, "other", {"train": _examples(20, 5), "test": _examples(6, 6)})
    with pytest.raises(UserError, match="needs its training data"):
        resolve_candidate(ws, "baseline:tfidf")
    with pytest.raises(UserError, match="picks its own models"):
        resolve_candidate(ws, "baseline:tfidf:tickets", model="fake:x")


def test_label_comparisons_show_the_baselines_as_reference_rows(ws):
    from tunelab.files import write_atomic
    from tunelab.prompts import commit_prompt

    write_atomic(ws.prompts_dir / "route.prompt", "---\nmodel: fake:route\noutput: {type: label, labels: "
                 "[account, billing, bug]}\n---\nuser:\nWhich team? {{ input }}\n")
    commit_prompt(ws, "route", "first")
    comp = compare(ws, "tickets:test", ["route"], progress=False)
    kinds = {c.name.split(":")[1] if c.kind == "baseline" else c.kind for c in comp.candidates}
    assert kinds == {"prompt", "majority", "tfidf"}
    tfidf = next(c for c in comp.candidates if c.name.startswith("baseline:tfidf"))
    assert tfidf.setup.how == "baseline" and tfidf.examples_trained == 60
    assert tfidf.cost_per_request >= 0 and tfidf.metric.value >= 0.9
    # the fake prompt model is at chance: the advice says so, and names the baseline that is not
    advice = comp.recommendation
    assert advice.recommendation == "none" and advice.headline.startswith("No candidate is usable yet")
    assert any("you may not need an LLM" in r for r in advice.reasons)
    none = compare(ws, "tickets:test", ["route"], progress=False, baselines=False)
    assert [c.kind for c in none.candidates] == ["prompt"]
    # the retrieval baseline answers labels too (the nearest train ticket's team), without label scores
    named = compare(ws, "tickets:test", ["route", "baseline:nearest"], progress=False)
    nearest = next(c for c in named.candidates if c.name.startswith("baseline:nearest"))
    majority = next(c for c in named.candidates if c.name.startswith("baseline:majority"))
    assert nearest.metric.value > majority.metric.value + 0.3 and nearest.confusion is not None
    assert [c.name.split(":")[1] for c in named.candidates if c.kind == "baseline"] == ["nearest", "majority", "tfidf"]


def test_learning_curves_of_the_baselines_and_the_demo_prompt(ws):
    """Every trainable candidate on 10/25/50/100% of train: the baselines retrained on the sample
    a fine-tune would get, the per-input-demo prompt with its demo pool limited to it."""
    from tunelab.compare.report import plot_learning_curve
    from tunelab.files import write_atomic
    from tunelab.prompts import commit_prompt

    write_atomic(ws.prompts_dir / "knn.prompt", "---\nmodel: fake:knn\noutput: {type: label, labels: [account, "
                 "billing, bug]}\ndemos: {dataset: tickets, split: train, strategy: knn_tfidf, k: 2}\n---\nuser:\n"
                 "Which team? {{ input }}\n")
    commit_prompt(ws, "knn", "first")
    comp = compare(ws, "tickets:test", ["knn"], learning_curve=True, progress=False)
    curve = comp.learning_curve
    kinds = {s.candidate.split(":")[1] if s.kind == "baseline" else s.kind: s for s in curve.series}
    assert set(kinds) == {"tfidf", "prompt"}  # the majority class is the floor, not a curve
    assert curve.points == [] and curve.candidate == ""  # no fine-tune in this comparison
    tfidf = kinds["tfidf"]
    assert [p.n_train for p in tfidf.points] == [6, 15, 30, 60]
    assert [p.fraction for p in tfidf.points] == [0.1, 0.25, 0.5, 1.0]
    assert tfidf.points[-1].candidate == next(c.name for c in comp.candidates if c.name.startswith("baseline:tfidf"))
    assert tfidf.points[0].candidate.startswith("baseline:tfidf-n6:tickets@")
    assert all(p.metric.low - 1e-9 <= p.metric.value <= p.metric.high + 1e-9 for p in tfidf.points)
    demo = kinds["prompt"]
    assert [p.n_train for p in demo.points] == [6, 15, 30, 60] and demo.points[0].candidate.endswith("~n6")
    # the fake model answers the label a demo names: its demos come from the smaller pool
    assert len({p.run_id for p in demo.points}) == 4
    assert curve.crossover is not None and curve.crossover.text
    assert plot_learning_curve(comp).startswith("data:image/png;base64,")
    # the baselines trained on the samples are stored, and reused by the next comparison
    again = compare(ws, "tickets:test", ["knn"], learning_curve=True, progress=False)
    assert [p.run_id for s in again.learning_curve.series for p in s.points] == \
        [p.run_id for s in curve.series for p in s.points]


def test_a_time_budget_leaves_out_the_series_that_do_not_fit_and_says_so(ws, tmp_path):
    """`curve_deadline` (the flow's --minutes): the baselines always run (seconds); a series whose
    estimated time does not fit what is left is left out, named with its estimate in the comparison,
    its report and the console table."""
    import io
    import time

    from rich.console import Console

    from tunelab.compare.report import print_table
    from tunelab.files import write_atomic
    from tunelab.flow import demo_flow, run_flow
    from tunelab.prompts import commit_prompt

    write_atomic(ws.prompts_dir / "knn.prompt", "---\nmodel: fake:knn\noutput: {type: label, labels: [account, "
                 "billing, bug]}\ndemos: {dataset: tickets, split: train, strategy: knn_tfidf, k: 2}\n---\nuser:\n"
                 "Which team? {{ input }}\n")
    commit_prompt(ws, "knn", "first")
    comp = compare(ws, "tickets:test", ["knn"], learning_curve=True, curve_deadline=time.monotonic(),
                   report=tmp_path / "report.html", progress=False)
    curve = comp.learning_curve
    assert [s.kind for s in curve.series] == ["baseline"]  # tfidf: the demo prompt did not fit
    assert len(curve.left_out) == 1 and curve.left_out[0].startswith("knn@")
    assert "three more evaluations would take" in curve.left_out[0]
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert 'id="curve-left-out"' in html and "--learning-curve" in html
    out = io.StringIO()
    print_table(comp, Console(file=out, width=200), advice=False)
    assert "learning curve left out by the time budget: knn@" in out.getvalue()
    # with time to spare, nothing is left out
    roomy = compare(ws, "tickets:test", ["knn"], learning_curve=True, curve_deadline=time.monotonic() + 600,
                    progress=False)
    assert {s.kind for s in roomy.learning_curve.series} == {"baseline", "prompt"} and not roomy.learning_curve.left_out
    with pytest.raises(UserError, match="--minutes must be a number of minutes above 0"):
        run_flow(tmp_path / "flow", demo_flow(), minutes=0)


def test_curve_points_on_a_sample_of_the_test_split(ws):
    """With a sample, every curve point (the 100% ones too) is measured on the same k test examples,
    chosen by content; the full comparison rows still use the whole split."""
    from tunelab.evaluate import sample_indices

    comp = compare(ws, "tickets:test", ["baseline:tfidf"], learning_curve=True, curve_sample=12, progress=False)
    curve = comp.learning_curve
    assert curve.n_eval == 12 and comp.dataset.n_examples == 30
    assert next(c for c in comp.candidates if c.name.startswith("baseline:tfidf")).n == 30
    test = get_dataset(ws, "tickets").split("test")
    chosen = sample_indices(test, 12)
    for point in curve.series[0].points:
        rows = run_rows(ws, point.run_id)
        assert sorted(r.example_index for r in rows) == chosen  # positions in the split: they pair up
    full = evaluate(ws, resolve_candidate(ws, "baseline:tfidf:tickets"), "tickets:test", progress=False)
    sampled = evaluate(ws, resolve_candidate(ws, "baseline:tfidf:tickets"), "tickets:test", sample=12, progress=False)
    assert sampled.id != full.id and sampled.reused and sampled.n_examples == 12
    by_full = {r.example_index: r.prediction for r in run_rows(ws, full.id)}
    assert all(by_full[r.example_index] == r.prediction for r in run_rows(ws, sampled.id))
    # the sample depends on the examples' content, not their order
    assert {test[::-1][i].input for i in sample_indices(test[::-1], 12)} == {test[i].input for i in chosen}
    with pytest.raises(UserError, match="at least 1"):
        evaluate(ws, resolve_candidate(ws, "baseline:tfidf:tickets"), "tickets:test", sample=0, progress=False)


def test_every_command_takes_a_baseline(ws, cli):
    import json

    res = cli("eval", "baseline:tfidf", "--data", "tickets:test", "--json")
    assert res.exit_code == 0, res.output
    run = json.loads(res.stdout)
    assert run["candidate"].startswith("baseline:tfidf:tickets@") and run["metrics"]["accuracy"]["value"] >= 0.9
    res = cli("run", "baseline:tfidf:tickets", "--input", "my invoice is wrong")
    assert res.exit_code == 0 and "billing" in res.stdout, res.output
    res = cli("compare", "--data", "tickets:test", "baseline:embed", "--json")
    assert res.exit_code == 0, res.output
    assert [c["name"].split(":")[1] for c in json.loads(res.stdout)["candidates"]] == ["embed", "majority", "tfidf"]
    res = cli("eval", "baseline:svm", "--data", "tickets:test")
    assert res.exit_code == 2 and "unknown baseline 'baseline:svm'" in res.stderr and "Traceback" not in res.output


def test_the_crossover_point_and_its_absence():
    from tunelab.compare.curves import crossover
    from tunelab.compare.result import CandidateEntry, CurveSeries, LearningCurvePoint

    def series(name, kind, values, ns=(20, 50, 100, 200)):
        return CurveSeries(candidate=name, kind=kind, points=[
            LearningCurvePoint(fraction=f, n_train=n, candidate=name, metric={"value": v})
            for f, n, v in zip((0.1, 0.25, 0.5, 1.0), ns, values)])

    prompt = CandidateEntry(name="p@1", kind="prompt", metric={"value": 0.6})
    ft = series("ft:a", "ft", [0.3, 0.5, 0.7, 0.8])  # crosses 0.6 halfway between 50 and 100
    cross = crossover([ft], [prompt])
    assert cross.n_train == pytest.approx(75.0) and cross.trained == "ft:a" and cross.prompting == "p@1"
    assert cross.text == "with fewer than ~75 labelled examples, prompting (p@1) wins; from there ft:a is better"
    never = crossover([series("ft:a", "ft", [0.3, 0.4, 0.5, 0.55])], [prompt])
    assert never.n_train is None and never.text.endswith("prompting (p@1) wins up to 200 labelled examples")
    always = crossover([series("baseline:tfidf:d@v", "baseline", [0.7, 0.8, 0.85, 0.9])], [prompt])
    assert always.n_train is None and "baseline:tfidf:d@v is at least as good as prompting (p@1) from 20" in always.text
    # a demo prompt's own curve is the prompting side where it beats the best prompt at that size
    demo = series("knn@1", "prompt", [0.65, 0.7, 0.72, 0.74])
    cross = crossover([ft, demo], [prompt])
    assert cross.prompting == "knn@1" and 100 < cross.n_train < 200
    assert crossover([ft], []) is None  # no prompt to compare with
    # where the two sides' intervals overlap around the crossover, the text says it is a point estimate
    wide = CurveSeries(candidate="ft:a", kind="ft", points=[
        LearningCurvePoint(fraction=f, n_train=n, candidate="ft:a", metric={"value": v, "low": v - 0.05, "high": v + 0.05})
        for f, n, v in zip((0.1, 0.25, 0.5, 1.0), (20, 50, 100, 200), (0.3, 0.58, 0.72, 0.8))])
    near = CandidateEntry(name="p@1", kind="prompt", metric={"value": 0.6, "low": 0.55, "high": 0.65})
    cross = crossover([wide], [near])
    assert cross.text.endswith("(point estimates: at 50 examples the two are within each other's 95% intervals)")
    assert "point estimates" not in crossover([ft], [prompt]).text  # no intervals, no claim about them


SLOTS = {"table": '{"people": 2}', "dinner": '{"time": "19:00"}', "lunch": '{"time": "12:30"}'}


@pytest.fixture
def slots(workspace):
    """JSON outputs: most inputs have no slot (`{}`); the others name one, with words that give it away."""
    def rows(n: int, seed: int) -> list[Example]:
        out = []
        for i in range(n):
            word = [None, "table", None, "dinner", None, "lunch"][i % 6]
            text = f"message {seed}-{i}: " + (f"a {word} please" if word else "hello there, just asking")
            out.append(Example(text, SLOTS[word] if word else "{}"))
        return out

    save_dataset(workspace, "slots", {"train": rows(36, 0), "test": rows(18, 1)})
    return workspace


def test_nearest_answers_the_most_similar_train_inputs_output_and_majority_the_most_frequent_json(slots):
    ws = slots
    nearest = resolve_candidate(ws, "baseline:nearest", data="slots:test")
    assert nearest.output.type == "json" and nearest.retrieval
    answers = nearest.predict([Example("could I get a dinner please", ""), Example("a table for us", ""),
                               Example("zzz qqq", "")])
    assert [a.text for a in answers[:2]] == [SLOTS["dinner"], SLOTS["table"]]
    train = {ex.output for ex in get_dataset(ws, "slots").split("train")}
    assert answers[2].text in train  # no word in common: still a train output
    assert all(a.label_logprobs is None for a in answers)
    result = evaluate(ws, nearest, "slots:test", progress=False)
    assert result.metrics["field_f1"]["value"] == 1.0 and result.metrics["json_valid"]["value"] == 1.0
    majority = resolve_candidate(ws, "baseline:majority:slots")
    assert {a.text for a in majority.predict([Example("a table please", ""), Example("dinner", "")])} == {"{}"}
    result = evaluate(ws, majority, "slots:test", progress=False)
    assert result.metrics["json_match"]["value"] == pytest.approx(0.5) and result.metrics["field_f1"]["value"] == 0.0


def test_label_classifiers_refuse_json_and_text_naming_what_fits(slots, cli):
    res = cli("eval", "baseline:tfidf", "--data", "slots:test")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "outputs are JSON" in res.stderr and "baseline:nearest" in res.stderr
    save_dataset(slots, "notes", {"train": [Example(f"note {i} about the {w}", f"A short note on the {w}, number {i}.")
                                            for i, w in enumerate(["sea", "hill", "town", "moor"] * 20)]})
    res = cli("eval", "baseline:majority:notes", "--data", "notes:train")
    assert res.exit_code == 2 and "outputs are free text" in res.stderr and "baseline:nearest" in res.stderr


def test_json_and_text_comparisons_show_their_reference_rows_scored_by_the_prompts_metrics(slots):
    from tunelab.files import write_atomic
    from tunelab.models import load_model
    from tunelab.prompts import commit_prompt

    ws = slots
    write_atomic(ws.prompts_dir / "extract.prompt", "---\nmodel: fake:json\noutput:\n  type: json\n  schema: "
                 "{type: object, properties: {people: {type: integer}, time: {type: string}}}\n---\nuser:\n"
                 "Extract: {{ input }}\n")
    commit_prompt(ws, "extract", "first")
    load_model("fake:json", ws).rules.update({"table": '{"people": 2}', "dinner": '{"time": "19:00"}'})
    comp = compare(ws, "slots:test", ["extract"], progress=False)
    rows = {c.name.split(":")[1] if c.kind == "baseline" else c.kind: c for c in comp.candidates}
    assert set(rows) == {"prompt", "majority", "nearest"} and comp.metric == "field_f1"
    assert rows["nearest"].metric.value == 1.0 and rows["majority"].metric.value == 0.0
    assert 0.0 < rows["prompt"].metric.value < 1.0  # the fake model misses the lunch times
    assert comp.recommendation.recommendation == "baseline"  # copying the nearest train output does better
    assert "baseline:nearest" in comp.recommendation.candidate

    notes = [Example(f"tell me about the {w} ({i})", f"The {w} is lovely in spring.")
             for i, w in enumerate(["sea", "hill", "town", "moor", "lake", "wood"] * 3)]
    save_dataset(ws, "notes", {"train": notes[:12], "test": notes[12:]})
    write_atomic(ws.prompts_dir / "write.prompt", "---\nmodel: fake:writer\noutput: {type: text}\n---\nuser:\n"
                 "Write about: {{ input }}\n")
    commit_prompt(ws, "write", "first")
    comp = compare(ws, "notes:test", ["write"], progress=False)
    rows = {c.name.split(":")[1] if c.kind == "baseline" else c.kind: c for c in comp.candidates}
    assert list(rows) == ["prompt", "copy", "nearest"] and comp.metric == "chrf"
    assert rows["nearest"].metric.value == 1.0  # the same words, the same note
    assert 0.0 < rows["copy"].metric.value < rows["nearest"].metric.value  # the input echoed: a floor


def test_a_json_learning_curve_retrains_nearest_on_shares_of_train(slots):
    from tunelab.files import write_atomic
    from tunelab.prompts import commit_prompt

    ws = slots
    write_atomic(ws.prompts_dir / "extract.prompt", "---\nmodel: fake:json\noutput: {type: json, metric: json_match}\n"
                 "---\nuser:\nExtract: {{ input }}\n")
    commit_prompt(ws, "extract", "first")
    comp = compare(ws, "slots:test", ["extract"], progress=False, learning_curve=True)
    series = {s.candidate.split(":")[1]: s for s in comp.learning_curve.series if s.kind == "baseline"}
    assert set(series) == {"nearest"} and comp.metric == "json_match"
    points = series["nearest"].points
    assert [p.n_train for p in points] == sorted(p.n_train for p in points) and points[-1].n_train == 36
    assert points[-1].metric.value == 1.0  # all of train: every test message has a train twin


def test_inputs_without_words_are_a_one_line_error_and_a_comparison_goes_on_without_that_row(workspace, cli):
    from tunelab.files import write_atomic
    from tunelab.prompts import commit_prompt

    save_dataset(workspace, "marks", {"train": [Example("!" * (1 + i % 3), ["up", "down"][i % 2]) for i in range(20)],
                                      "test": [Example("?", "up"), Example("!", "down")]})
    res = cli("eval", "baseline:tfidf", "--data", "marks:test")
    assert res.exit_code == 2 and "Traceback" not in res.output and "no words to weigh" in res.stderr
    write_atomic(workspace.prompts_dir / "mark.prompt", "---\nmodel: fake:mark\noutput: {type: label, labels: "
                 "[up, down]}\n---\nuser:\nUp or down? {{ input }}\n")
    commit_prompt(workspace, "mark", "first")
    said: list[str] = []
    comp = compare(workspace, "marks:test", ["mark"], progress=False, log=said.append)
    assert [c.name.split(":")[1] for c in comp.candidates if c.kind == "baseline"] == ["majority"]
    assert any("baseline:tfidf left out" in line and "no words to weigh" in line for line in said)


def test_copy_answers_with_the_input_and_refuses_json(slots, cli):
    notes = [Example(f"the {w} at dawn ({i})", f"At dawn the {w} is quiet, note {i}.")
             for i, w in enumerate(["sea", "hill", "town", "moor"] * 10)]
    save_dataset(slots, "notes", {"train": notes[:30], "test": notes[30:]})
    copy = resolve_candidate(slots, "baseline:copy", data="notes:test")
    assert copy.output.type == "text" and copy.setup.examples == 0  # it learns nothing from train
    assert [a.text for a in copy.predict(notes[30:32])] == [ex.input for ex in notes[30:32]]
    result = evaluate(slots, copy, "notes:test", progress=False)
    assert 0.0 < result.metrics["chrf"]["value"] < 1.0 and result.metrics["copy_rate"]["value"] == 1.0
    res = cli("eval", "baseline:copy:slots", "--data", "slots:test")
    assert res.exit_code == 2 and "outputs are JSON" in res.stderr and "Traceback" not in res.output
