"""compare(): every candidate on the same split, runs reused, paired tests, setup costs, report."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from tests.fakes import fake_finetune
from tests.test_hybrid import hybrid_ws  # noqa: F401  (fixture: tickets data, prim/fall prompts on fake models)
from tunelab.compare import compare, load_comparison
from tunelab.hybrid import create_hybrid
from tunelab.errors import NotFound, UserError
from tunelab.store.models import ComparisonRow, OptimizationRow, RunRow


def _runs(ws) -> int:
    with ws.store.session() as s:
        return s.scalar(select(func.count()).select_from(RunRow))


def test_compare_same_split_significance_routing_and_report(hybrid_ws):  # noqa: F811
    create_hybrid(hybrid_ws, "h", "prim", "fall", data="tickets", progress=False)
    typed = compare(hybrid_ws, "tickets:test", ["prim", "fall", "hybrid:h"], volume=50_000, progress=False)
    comp = typed.to_json()  # the JSON twin: what --json prints and report.json holds

    names = [c["name"] for c in comp["candidates"]]
    assert names[2] == "hybrid:h" and names[0].startswith("prim@")
    by = {c["kind"] + ("-f" if c["name"].startswith("fall") else ""): c for c in comp["candidates"]}
    # every candidate ran on the same dataset version and split
    with hybrid_ws.store.session() as s:
        runs = [s.get(RunRow, c["run_id"]) for c in comp["candidates"]]
    assert {(r.dataset, r.dataset_version, r.split, r.n_examples) for r in runs} == {
        ("tickets", comp["dataset"]["version"], "test", 20)}

    assert comp["metric"] == "accuracy" and comp["best"] == "hybrid:h"
    assert by["hybrid"]["metric"]["value"] == 1.0 and by["prompt"]["metric"]["value"] == 0.5
    lo, hi = by["prompt"]["metric"]["low"], by["prompt"]["metric"]["high"]
    assert lo < 0.5 < hi
    # paired test against the best: the hybrid fixes 10 errors and breaks none -> McNemar p = 2 * 0.5^10
    vs = by["prompt"]["vs_best"]
    assert vs["test"] == "mcnemar" and vs["p_value"] == pytest.approx(2 * 0.5 ** 10) and vs["significant"]
    assert vs["difference"] == pytest.approx(-0.5)
    # the classical reference rows come with every label comparison: 5 candidates, 10 pairs
    assert [c["kind"] for c in comp["candidates"]][3:] == ["baseline", "baseline"]
    assert names[3].startswith("baseline:majority:tickets@") and names[4].startswith("baseline:tfidf:tickets@")
    assert len(comp["pairwise"]) == 10 and by["hybrid"]["vs_best"] is None

    routing = by["hybrid"]["routing"]
    assert routing["primary"] == 0.5 and routing["fallback"] == 0.5 and routing["reasons"] == {"unsure": 0.5}
    # the hybrid paid for two models on half the requests
    assert by["hybrid"]["tokens"]["prompt"] > by["prompt"]["tokens"]["prompt"]
    assert by["hybrid"]["setup"]["wall_s"] > 0 and "threshold tuning" in by["hybrid"]["setup"]["sources"][-1]
    assert by["prompt"]["confusion"]["labels"] == ["billing", "bug"]
    assert sum(map(sum, by["prompt"]["confusion"]["matrix"])) == 20
    assert len(by["prompt"]["latency"]["samples"]) == 20
    assert by["prompt"]["flexibility"]["how"] == "prompt edit + re-evaluation"
    # the words give the team away: TF-IDF is as good as the hybrid, and the advice says so
    assert comp["recommendation"]["recommendation"] == "baseline"
    assert comp["recommendation"]["candidate"].startswith("baseline:tfidf:tickets@")
    assert comp["recommendation"]["headline"].startswith("You may not need an LLM for this task")
    llms = compare(hybrid_ws, "tickets:test", ["prim", "fall", "hybrid:h"], volume=50_000, progress=False,
                   baselines=False)
    assert llms.recommendation.candidate == "hybrid:h" and llms.entry("hybrid:h").routing.fallback == 0.5

    # stored, with its report and JSON twin
    report = comp["report"]
    assert report.endswith("report.html")
    twin = json.loads(open(report.replace("report.html", "report.json")).read())
    assert twin == comp
    assert load_comparison(hybrid_ws, "latest") == llms
    assert load_comparison(hybrid_ws, comp["id"][:6]) == typed


def test_compare_reuses_identical_runs(hybrid_ws):  # noqa: F811
    first = compare(hybrid_ws, "tickets:test", ["prim", "fall"], progress=False).to_json()
    before = _runs(hybrid_ws)
    second = compare(hybrid_ws, "tickets:test", ["fall", "prim"], progress=False).to_json()  # baselines too
    assert _runs(hybrid_ws) == before
    assert all(c["reused_run"] for c in second["candidates"])
    assert {c["run_id"] for c in first["candidates"]} == {c["run_id"] for c in second["candidates"]}
    with hybrid_ws.store.session() as s:
        assert s.scalar(select(func.count()).select_from(ComparisonRow)) == 2
    # a different split is a different run
    compare(hybrid_ws, "tickets:validation", ["prim"], progress=False, baselines=False)
    assert _runs(hybrid_ws) == before + 1


def test_setup_cost_from_optimization_and_engineer_rate(hybrid_ws):  # noqa: F811
    from tunelab.prompts import commit_prompt, load_prompt

    version = commit_prompt(hybrid_ws, "fall", "seed")
    with hybrid_ws.store.session() as s:
        s.add(OptimizationRow(id="opt1", prompt="fall", dataset="tickets", status="done",
                              result={"seed_version": "0" * 12, "version": version}, wall_s=1800.0, tokens=5000,
                              cost=0.25))
        # a search around prim's version that found nothing better: still prim's setup
        prim_version = load_prompt(hybrid_ws, "prim").version
        s.add(OptimizationRow(id="opt2", prompt="prim", dataset="tickets", status="done",
                              result={"seed_version": prim_version, "version": None}, wall_s=60.0, cost=0.01))
    hybrid_ws.config.engineer_hourly_rate = 60.0
    comp = compare(hybrid_ws, "tickets:test", ["prim", f"fall@{version}"], volume=1000, progress=False,
                   engineer_hours={"prompt": 0.0}).to_json()
    fall = next(c for c in comp["candidates"] if c["name"].startswith("fall"))
    assert fall["setup"]["wall_s"] == 1800.0 and fall["setup"]["compute_cost"] == 0.25
    assert fall["setup"]["engineer_cost"] == 0.0 and fall["setup"]["total_cost"] == 0.25
    assert "optimization opt1" in fall["setup"]["sources"][0]
    prim = next(c for c in comp["candidates"] if c["name"].startswith("prim"))
    assert prim["setup"]["compute_cost"] == 0.01 and "optimization opt2" in prim["setup"]["sources"][0]
    # the seed of an optimization that committed a better version does not carry its cost
    with hybrid_ws.store.session() as s:
        s.get(OptimizationRow, "opt2").result = {"seed_version": prim_version, "version": "e" * 12}
    seed = compare(hybrid_ws, "tickets:test", ["prim"], progress=False).to_json()["candidates"][0]
    assert seed["setup"]["total_cost"] == 0.0 and "hand-written" in seed["setup"]["sources"][0]
    assert fall["cost_horizon"] == pytest.approx(0.25 + 12 * 1000 * fall["cost_per_request"])
    assert comp["engineer_hourly_rate"] == 60.0

    comp2 = compare(hybrid_ws, "tickets:test", [f"fall@{version}"], progress=False).to_json()
    fall2 = comp2["candidates"][0]
    assert fall2["setup"]["engineer_hours"] == pytest.approx(0.5)  # default: the setup's wall time
    assert fall2["setup"]["total_cost"] == pytest.approx(0.25 + 30.0)


def test_compare_errors(hybrid_ws):  # noqa: F811
    before = _runs(hybrid_ws)
    with pytest.raises(NotFound):
        compare(hybrid_ws, "tickets:test", ["prim", "nope"], progress=False)
    assert _runs(hybrid_ws) == before  # every name is checked before any work
    with pytest.raises(UserError, match="named twice"):
        compare(hybrid_ws, "tickets:test", ["prim", "prim"], progress=False)
    with pytest.raises(UserError, match="needs a trainable candidate"):
        compare(hybrid_ws, "tickets:test", ["prim"], learning_curve=True, progress=False, baselines=False)
    with pytest.raises(NotFound):
        compare(hybrid_ws, "tickets:nosplit", ["prim"], progress=False)
    with pytest.raises(NotFound):
        load_comparison(hybrid_ws, "zzzz")


# -- the CLI -------------------------------------------------------------------------------------
def test_cli_compare_advise_hybrid(hybrid_ws, cli):  # noqa: F811
    res = cli("advise")
    assert res.exit_code == 2 and "no comparisons yet" in res.stderr and "Traceback" not in res.output

    res = cli("hybrid", "create", "h", "--model", "prim", "--fallback", "fall", "--data", "tickets")
    assert res.exit_code == 0, res.output
    assert "hybrid:h" in res.stdout and "margin threshold" in res.stdout
    res = cli("hybrid", "show", "h", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["name"] == "h"
    assert "hybrid:h" in cli("hybrid", "list").stdout

    res = cli("compare", "--data", "tickets:test", "prim", "hybrid:h", "--volume", "20000", "--json")
    assert res.exit_code == 0, res.output
    comp = json.loads(res.stdout)
    assert comp["volume_per_month"] == 20000
    assert [c["kind"] for c in comp["candidates"]] == ["prompt", "hybrid", "baseline", "baseline"]
    res = cli("compare", "--data", "tickets:test", "prim", "hybrid:h", "--volume", "20000", "--json", "--no-baselines")
    comp = json.loads(res.stdout)
    assert [c["kind"] for c in comp["candidates"]] == ["prompt", "hybrid"]

    report = hybrid_ws.root / "out" / "r.html"
    res = cli("compare", "--data", "tickets:test", "prim", "hybrid:h", "--report", str(report), "--no-baselines")
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.stdout and f"report: {report}" in res.stdout and "recommendation" in res.stdout
    assert report.is_file() and (report.parent / "r.json").is_file()

    res = cli("advise", "--json", "--required-metric", "0.99")
    assert res.exit_code == 0 and json.loads(res.stdout)["recommendation"] == "hybrid"
    res = cli("advise", "--comparison", comp["id"], "--budget", "0", "--volume", "5")
    assert res.exit_code == 0 and "Hybrid" in res.stdout

    for args, message in [
        (("advise", "--change-frequency", "daily"), "change-frequency"),
        (("advise", "--comparison", "nope"), "unknown comparison"),
        (("compare", "--data", "tickets:test", "prim", "nope"), "nope"),
        (("compare", "--data", "tickets:test", "prim", "--engineer-hours", "lots"), "NAME=HOURS"),
        (("hybrid", "create", "x", "--model", "prim", "--fallback", "fall", "--data", "tickets", "--threshold", "big"),
         "threshold"),
        (("hybrid", "show", "nope"), "unknown hybrid"),
    ]:
        res = cli(*args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.stderr and "Traceback" not in res.output and len(res.stderr.strip().splitlines()) == 1


def test_learning_curve_trains_on_shares_of_train_and_reuses_them(hybrid_ws, monkeypatch):  # noqa: F811
    """The learning curve with the training itself faked: configs, names, reuse and the points."""
    from tunelab import finetune as ft
    from tunelab.prompts import commit_prompt

    version = commit_prompt(hybrid_ws, "prim", "for the fine-tune")
    ds_version = tickets_version(hybrid_ws)
    right = {"card": "billing", "crash": "bug", "refund": "billing", "freeze": "bug"}
    known = {"tk": 4, "tk-lc50": 3, "tk-lc25": 2, "tk-lc10": 1}  # how many of the 4 kinds each one gets right

    def rules(name):
        n = known[name]
        return {w: (lab if i < n else ("bug" if lab == "billing" else "billing")) for i, (w, lab) in enumerate(right.items())}

    fake_finetune(hybrid_ws, "tk", prompt=f"prim@{version}", dataset=f"tickets@{ds_version}", rules=rules("tk"),
                  config={"lr": 0.001, "epochs": 2, "data": "tickets", "name": "tk"}, wall_s=100.0, cost=0.01)
    trained = []

    def fake_train(ws, config, resume=False, **_):
        trained.append(config)
        fake_finetune(ws, config.name, prompt=f"prim@{version}", dataset=f"tickets@{ds_version}",
                      rules=rules(config.name), n_train=config.max_examples, wall_s=config.max_examples * 2.5,
                      cost=0.0, config=config.model_dump(mode="json"))

    monkeypatch.setattr(ft, "finetune", fake_train)
    comp = compare(hybrid_ws, "tickets:test", ["prim", "ft:tk"], learning_curve=True, progress=False,
                   baselines=False).to_json()
    curve = comp["learning_curve"]
    # the prompt (0.5, no training data) wins below ~10 examples: 0.25 at 4, 0.5 at 10
    assert curve["crossover"]["n_train"] == pytest.approx(10.0)
    assert curve["crossover"]["text"].startswith("with fewer than ~10 labelled examples, prompting (prim@")
    assert [s["kind"] for s in curve["series"]] == ["ft"] and curve["series"][0]["points"] == curve["points"]
    assert curve["candidate"] == "ft:tk"
    assert [p["n_train"] for p in curve["points"]] == [4, 10, 20, 40]
    assert [p["metric"]["value"] for p in curve["points"]] == [0.25, 0.5, 0.75, 1.0]
    assert [c.name for c in trained] == ["tk-lc10", "tk-lc25", "tk-lc50"]
    assert all(c.data == f"tickets@{ds_version}" and c.prompt == f"prim@{version}" and c.lr == 0.001 and c.epochs == 2
               for c in trained)
    ft_entry = next(c for c in comp["candidates"] if c["kind"] == "ft")
    assert ft_entry["examples_trained"] == 40 and ft_entry["setup"]["compute_cost"] == 0.01
    assert ft_entry["flexibility"]["how"] == "retrain + re-evaluation" and ft_entry["flexibility"]["change_s"] >= 100
    # again: nothing is trained twice
    trained.clear()
    again = compare(hybrid_ws, "tickets:test", ["prim", "ft:tk"], learning_curve=True, progress=False,
                    baselines=False).to_json()
    assert trained == [] and again["learning_curve"]["points"] == curve["points"]


def tickets_version(ws) -> str:
    from tunelab.datasets import get_dataset

    return get_dataset(ws, "tickets").version
