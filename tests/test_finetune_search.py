"""`tunelab finetune --search N`: an Optuna search (TPE sampler, median pruner on each epoch's
validation) over fine-tunes of a tiny random Llama; the best trial becomes ft:NAME with the search
in its row and a plot; a search interrupted mid-trial continues where it stopped; bad search input
is a one-line error, exit 2."""

from __future__ import annotations

import json

import pytest

import tests.test_finetune as _finetune_tests
from tunelab.errors import UserError
from tunelab.finetune import FineTuneConfig
from tunelab.finetune.job import Pruned, finetune, get_row
from tunelab.finetune.search import SearchSpace, load_space, search

examples, tiny_base, ws = _finetune_tests.examples, _finetune_tests.tiny_base, _finetune_tests.ws  # fixtures

SPACE = SearchSpace(lr=(1e-3, 2e-2), epochs=(1, 2), lora_r=[2, 4], lora_alpha_ratio=[1.0, 2.0],
                    target_modules=["q_proj,v_proj"])


def config(tiny_base, name: str = "s") -> FineTuneConfig:
    return FineTuneConfig(data="sms", prompt="spam", name=name, base=str(tiny_base), batch_size=8,
                          patience=None, max_val_examples=6)


@pytest.mark.slow
def test_search_keeps_the_best_trial_as_the_model(ws, tiny_base):
    from tunelab.evaluate import evaluate, resolve_candidate

    result = search(ws, config(tiny_base), trials=3, space=SPACE, progress=False)
    assert result.candidate == "ft:s" and len(result.trials) == 3
    assert {t["state"] for t in result.trials} <= {"complete", "pruned"}
    complete = [t for t in result.trials if t["state"] == "complete"]
    best = max(complete, key=lambda t: t["value"])
    assert result.best_trial == best["number"]
    for t in complete:  # one validation per epoch, each reported to the pruner
        assert len(t["curve"]) == t["params"]["epochs"]
        assert 1e-3 <= t["params"]["lr"] <= 2e-2 and t["params"]["lora_r"] in (2, 4)
    row = get_row(ws, "s")
    assert row.status == "done" and row.result["search"]["best_finetune"] == f"s-t{best['number']}"
    assert row.wall_s == pytest.approx(sum(t["wall_s"] for t in result.trials), abs=0.05)
    assert row.config["lora_r"] == best["params"]["lora_r"]
    assert (ws.artifacts_dir / "searches" / "s" / "search.png").stat().st_size > 1000
    assert (ws.artifacts_dir / "finetunes" / "s" / "adapter" / "adapter_config.json").is_file()
    run = evaluate(ws, resolve_candidate(ws, "ft:s"), "sms:test", progress=False)
    assert run.metrics["accuracy"]["n"] == 12


def test_a_pruned_fine_tune_is_left_pruned(ws, tiny_base):
    def prune(k, result, last):
        raise Pruned(f"pruned after validation {k + 1}")

    with pytest.raises(Pruned):
        finetune(ws, config(tiny_base, "p").model_copy(update={"epochs": 2}), progress=False, on_validation=prune)
    row = get_row(ws, "p")
    assert row.status == "pruned" and row.result["error"] == "pruned after validation 1"


def test_each_validation_is_reported_with_whether_it_is_the_last(ws, tiny_base):
    seen = []
    result = finetune(ws, config(tiny_base, "v").model_copy(update={"epochs": 2}), progress=False,
                      on_validation=lambda k, result, last: seen.append((k, last, result["metric"])))
    assert [(k, last) for k, last, _ in seen] == [(0, False), (1, True)]  # the pruner may stop only the first
    curve = result.curves["eval_curve"]
    assert [e["metric"] for e in curve] == [m for _, _, m in seen]


@pytest.mark.slow
def test_an_interrupted_search_continues_where_it_stopped(ws, tiny_base, monkeypatch):
    from tunelab.finetune import checkpoint

    save = checkpoint.save

    def save_then_interrupt(target, model, optimizer, scheduler, state):  # Ctrl-C right after trial 1's checkpoint
        save(target, model, optimizer, scheduler, state)
        if "r-t1" in str(target):
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_interrupt)
    cfg = config(tiny_base, "r").model_copy(update={"save_every_steps": 2})
    with pytest.raises(KeyboardInterrupt):
        search(ws, cfg, trials=2, space=SPACE, progress=False)
    assert get_row(ws, "r-t0").status == "done" and get_row(ws, "r-t1").status == "failed"
    monkeypatch.setattr(checkpoint, "save", save)
    lines = []
    result = search(ws, cfg, trials=2, space=SPACE, progress=False, log=lines.append)
    assert any("trial 1 did not finish: queued again" in line for line in lines)
    assert any("resuming at step 2" in line for line in lines)
    assert [t["finetune"] for t in result.trials] == ["r-t0", "r-t1"]  # the retried trial ran as r-t1
    assert get_row(ws, "r-t1").status == "done" and get_row(ws, "r").status == "done"

    # a resumed search draws new settings, not again the ones its killed process drew first
    def interrupt_first(target, model, optimizer, scheduler, state):
        save(target, model, optimizer, scheduler, state)
        if "s-t0" in str(target):
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", interrupt_first)
    other = cfg.model_copy(update={"name": "s"})
    with pytest.raises(KeyboardInterrupt):
        search(ws, other, trials=2, space=SPACE, progress=False)
    monkeypatch.setattr(checkpoint, "save", save)
    resumed = search(ws, other, trials=2, space=SPACE, progress=False)
    first, drawn = (t["params"] for t in resumed.trials)
    assert drawn["lr"] != first["lr"]  # a continuous draw: equal only if the sampler started over


@pytest.mark.parametrize("text, words", [
    ("lr: [3e-3, 1e-4]\n", ["lr", "empty"]),
    ("epochs: [3, 1]\n", ["epochs", "empty"]),
    ("lora_r: []\n", ["lora_r", "at least one choice"]),
    ("rank: [4]\n", ["unknown key 'rank'"]),
    ("base: [nosuch-model]\n", ["unknown base model 'nosuch-model'"]),
])
def test_bad_search_space_exits_2_with_one_line(ws, cli, tiny_base, tmp_path, text, words):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    r = cli("finetune", "--data", "sms", "--prompt", "spam", "--name", "bad", "--base", str(tiny_base),
            "--search", "2", "--search-space", path)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1
    for w in words:
        assert w in r.stderr, r.stderr
    assert get_row(ws, "bad") is None


@pytest.mark.parametrize("flags, words", [
    (["--search", "0"], ["--search", "at least 1"]),
    (["--search-minutes", "0"], ["--search-minutes", "positive"]),
    (["--base", "nosuch-base"], ["no such model folder"]),
])
def test_bad_budget_or_base_exits_2(ws, cli, tiny_base, flags, words):
    base = [] if "--base" in flags else ["--base", str(tiny_base)]
    r = cli("finetune", "--data", "sms", "--prompt", "spam", "--name", "bad", *base, *flags)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1
    for w in words:
        assert w in r.stderr, r.stderr


def test_search_cli_prints_the_search(ws, cli, tiny_base, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("lr: [0.005, 0.005]\nepochs: [1, 1]\nlora_r: [2]\ntarget_modules: [q_proj]\n")
    r = cli("finetune", "--data", "sms", "--prompt", "spam", "--name", "c", "--base", str(tiny_base),
            "--search", "2", "--search-space", path, "--max-val-examples", "4", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["model"] == "ft:c" and len(out["search"]["trials"]) == 2
    assert load_space(path).lr == (0.005, 0.005)
    with pytest.raises(UserError):
        search(ws, config(tiny_base, "c"), trials=1, space=SPACE)  # ft:c exists now
