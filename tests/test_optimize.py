"""The optimizer with fake models whose accuracy depends on the prompt: the search finds the better
candidate, keeps to its budget, prefers the shorter prompt at equal scores, says so when nothing
beats the seed, stores its provenance, uses a proposer, and never touches the test split."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from tunelab.datasets import Example, save_dataset
from tunelab.errors import UserError
from tunelab.models.fake import FakeModel
from tunelab.optimize import Budget, optimize
from tunelab.prompts import load_prompt, prompt_log, prompt_versions
from tunelab.store.models import OptimizationRow, RunRow

SEED_PROMPT = """---
output: {type: label, labels: [ham, spam]}
---
system:
Classify the message.
user:
{{ input }}
"""


def examples(n: int, offset: int) -> list[Example]:
    out = []
    for i in range(n):
        if i % 2:
            out.append(Example(f"win a cash prize now {i + offset}", "spam"))
        else:
            out.append(Example(f"lunch at noon with bob {i + offset}", "ham"))
    return out


def truth(text: str) -> str:
    return "spam" if "prize" in text else "ham"


class Sensitive(FakeModel):
    """Right when the prompt states the output contract or shows demos; else always 'spam'."""

    def _answer(self, req):
        if self.queue:
            return self.queue.popleft()
        text = " ".join(m["content"] for m in req.messages)
        if "exactly one of" in text or any(m["role"] == "assistant" for m in req.messages):
            return truth(req.messages[-1]["content"])
        return "spam"


class Oracle(FakeModel):
    """Always right: every prompt scores the same."""

    def _answer(self, req):
        return truth(req.messages[-1]["content"])


class Codeword(FakeModel):
    """Right only when the instruction says CODEWORD (which only the proposer writes)."""

    def _answer(self, req):
        if any("CODEWORD" in m["content"] for m in req.messages):
            return truth(req.messages[-1]["content"])
        return "spam"


@pytest.fixture
def tiny(workspace):
    ds = save_dataset(workspace, "tiny", {"train": examples(30, 0), "validation": examples(30, 1000),
                                          "test": examples(20, 2000)})
    (workspace.prompts_dir / "spam.prompt").write_text(SEED_PROMPT, encoding="utf-8")
    return ds


FAST = ("stratified", "random", "knn_tfidf")  # knn_embed loads a sentence encoder: left to the real-model test


def test_search_finds_the_better_candidate_and_commits_it(workspace, tiny):
    model = Sensitive(name="sensitive")
    result = optimize(workspace, "spam", "tiny", budget=8, model=model, demo_strategies=FAST, progress=False)
    assert result.seed["score"] == pytest.approx(0.5)
    assert result.improved and result.winner["score"] == 1.0
    assert result.version is not None
    # the new version is current, and its text is what won
    new = load_prompt(workspace, "spam@current")
    assert new.version == result.version
    messages = new.render(Example("win a prize", ""))
    assert "exactly one of" in " ".join(m["content"] for m in messages) or new.demos
    # the working file follows the committed version (it had no uncommitted changes)
    assert load_prompt(workspace, "spam").version == result.version
    # the winner's test score is reported apart from validation
    assert result.test["winner"]["value"] == 1.0 and result.test["seed"]["value"] == 0.5
    assert result.test["winner"]["run_id"] != result.winner["run_ids"][-1]


def test_provenance_in_the_commit_and_the_optimizations_table(workspace, tiny):
    result = optimize(workspace, "spam", "tiny", budget=6, model=Sensitive(name="sensitive"),
                      demo_strategies=FAST, progress=False)
    log = prompt_log(workspace, "spam")
    assert [c.message for c in log][-1] == "optimization seed"  # the seed became the parent
    head = log[0]
    assert head.version == result.version and head.parent == result.seed_version
    prov = head.meta["optimization"]
    assert prov["id"] == result.id and prov["parent_version"] == result.seed_version
    assert prov["strategy"] in ("instruction", "demos")
    assert prov["validation"]["value"] == 1.0 and prov["validation"]["lo"] < 1.0
    assert prov["seed_validation"]["value"] == 0.5
    assert prov["budget"]["used"] <= 6 and prov["tokens"] > 0
    assert prov["demos"]["strategy"] == result.winner["demos"]["strategy"]
    with workspace.store.session() as s:
        row = s.get(OptimizationRow, result.id)
    assert row.status == "done" and row.prompt == "spam" and row.dataset == "tiny"
    assert len(row.candidates) == len(result.candidates) <= 6
    assert all({"name", "score", "prompt_tokens", "stage"} <= set(c) for c in row.candidates)
    assert row.result["version"] == result.version and row.result["test"]["winner"]["value"] == 1.0
    assert row.wall_s > 0 and row.tokens == result.tokens > 0


def test_fixed_demos_are_written_inline(workspace, tiny):
    # no instruction variant helps this model: only demos do
    class DemosOnly(FakeModel):
        def _answer(self, req):
            if any(m["role"] == "assistant" for m in req.messages):
                return truth(req.messages[-1]["content"])
            return "spam"

    result = optimize(workspace, "spam", "tiny", budget=12, model=DemosOnly(name="d"),
                      demo_strategies=("stratified", "random"), test=False, progress=False)
    assert result.improved and result.winner["stage"] == "demos"
    new = load_prompt(workspace, f"spam@{result.version}")
    demos = new.demos
    assert isinstance(demos, list) and demos  # inline, self-contained
    train_inputs = {ex.input for ex in tiny.split("train")}
    assert all(d.input in train_inputs for d in demos)
    assert result.winner["demos"] == {"strategy": "stratified", "per_label": 1}  # the shortest of the perfect ones


def test_budget_in_candidates_is_respected(workspace, tiny):
    model = Sensitive(name="sensitive")
    result = optimize(workspace, "spam", "tiny", budget=3, model=model, demo_strategies=FAST, test=False,
                      progress=False)
    assert len(result.candidates) == 3 and result.budget["used"] == 3
    # every request the search sent was a validation input (30 per candidate at most)
    assert len(model.calls) <= 3 * 30


def test_budget_in_time_stops_the_search(workspace, tiny):
    slow = Sensitive(name="slow", latency_s=0.01)  # 0.3 s per candidate
    result = optimize(workspace, "spam", "tiny", budget="1s", model=slow, demo_strategies=FAST, test=False,
                      progress=False)
    assert result.budget["seconds"] == 1.0
    assert 1 <= len(result.candidates) <= 5
    assert result.wall_s < 5


def test_length_breaks_ties_toward_the_shorter_prompt(workspace, tiny):
    # the seed shows 8 demos; every candidate is perfect, so the shortest one wins
    seed = SEED_PROMPT.replace("---\nsystem:", "demos: {dataset: tiny, k: 8, strategy: stratified}\n---\nsystem:")
    (workspace.prompts_dir / "spam.prompt").write_text(seed, encoding="utf-8")
    result = optimize(workspace, "spam", "tiny", budget=6, model=Oracle(name="oracle"), demo_strategies=FAST,
                      test=False, progress=False)
    full = [c for c in result.candidates if c["status"] == "ok"]
    assert all(c["score"] == 1.0 for c in full)
    assert result.improved
    assert result.winner["prompt_tokens"] == min(c["prompt_tokens"] for c in full)
    assert result.winner["prompt_tokens"] < result.seed["prompt_tokens"] / 2
    assert "tokens per request" in result.message


def test_nothing_beats_the_seed(workspace, tiny):
    # equal scores everywhere and the seed is the shortest: keep it, commit nothing
    short = "---\noutput: {type: label, labels: [ham, spam]}\n---\n{{ input }}\n"
    (workspace.prompts_dir / "spam.prompt").write_text(short, encoding="utf-8")
    result = optimize(workspace, "spam", "tiny", budget=5, model=Oracle(name="oracle"), demo_strategies=FAST,
                      test=False, progress=False)
    assert not result.improved and result.version is None
    assert result.message.startswith("Nothing beat the seed prompt")
    assert result.winner["id"] == result.seed["id"]
    assert prompt_versions(workspace, "spam") == []  # not even the seed was committed
    with workspace.store.session() as s:
        row = s.get(OptimizationRow, result.id)
    assert row.status == "done" and row.result["improved"] is False and row.result["version"] is None


def test_max_prompt_tokens_rejects_long_candidates(workspace, tiny):
    result = optimize(workspace, "spam", "tiny", budget=12, model=Sensitive(name="s"), demo_strategies=FAST,
                      max_prompt_tokens=30, test=False, progress=False)
    statuses = {c["status"] for c in result.candidates}
    assert "too_long" in statuses
    assert all(c["prompt_tokens"] <= 30 for c in result.candidates if c["status"] == "ok")
    assert result.improved and result.winner["prompt_tokens"] <= 30


def test_proposer_rewrites_from_train_failures(workspace, tiny):
    proposer = FakeModel(name="proposer")
    proposer.enqueue("Here you go:\n<instruction>Read closely. CODEWORD.</instruction>")
    model = Codeword(name="codeword")
    result = optimize(workspace, "spam", "tiny", budget=4, model=model, proposer=proposer, demo_strategies=(),
                      test=False, progress=False)
    assert result.improved and result.winner["stage"] == "proposer"
    assert "CODEWORD" in result.winner["instruction"]["text"] and result.winner["score"] == 1.0
    (ask,) = proposer.calls
    text = ask.messages[-1]["content"]
    assert "expected: ham" in text and "the model answered: spam" in text  # failures shown
    train = {ex.input for ex in tiny.split("train")}
    others = {ex.input for ex in tiny.split("validation") + tiny.split("test")}
    assert any(t in text for t in train)
    assert not any(t in text for t in others)  # failures come from train only


def test_proposer_reply_without_an_instruction_is_noted(workspace, tiny):
    proposer = FakeModel(name="proposer").enqueue("<instruction>{{ secrets }}</instruction>")
    result = optimize(workspace, "spam", "tiny", budget=3, model=Codeword(name="c"), proposer=proposer,
                      demo_strategies=(), test=False, progress=False)
    assert all(c["stage"] != "proposer" for c in result.candidates)
    assert any("no usable instruction" in n for n in result.notes)


class Poisoned(list):
    """A split that records and refuses every read."""

    touched: list[str] = []

    def _refuse(self, *a, **k):
        Poisoned.touched.append("read")
        raise AssertionError("the test split was read during the search")

    __iter__ = __getitem__ = __len__ = __contains__ = __bool__ = _refuse


def test_the_test_split_is_never_read_during_the_search(workspace, tiny, monkeypatch):
    import tunelab.datasets as datasets

    real = datasets.get_dataset
    test_inputs = {ex.input for ex in tiny.split("test")}

    def guarded(ws, ref):
        ds = real(ws, ref)
        ds.splits["test"] = Poisoned()
        return ds

    monkeypatch.setattr(datasets, "get_dataset", guarded)
    Poisoned.touched = []
    model = Sensitive(name="sensitive")
    proposer = FakeModel(name="p").enqueue("<instruction>Label it.</instruction>")
    result = optimize(workspace, "spam", "tiny", budget=12, model=model, proposer=proposer,
                      demo_strategies=FAST, test=False, progress=False)
    assert Poisoned.touched == []
    assert result.test is None and len(result.candidates) > 5
    seen = [m["content"] for req in model.calls + proposer.calls for m in req.messages]
    assert not any(t in text for t in test_inputs for text in seen)
    with workspace.store.session() as s:
        assert {r.split for r in s.scalars(select(RunRow))} == {"validation"}


def test_the_test_split_is_scored_only_after_the_search(workspace, tiny):
    model = Sensitive(name="sensitive")
    result = optimize(workspace, "spam", "tiny", budget=6, model=model, demo_strategies=FAST, progress=False)
    test_inputs = {ex.input for ex in tiny.split("test")}
    val_inputs = {ex.input for ex in tiny.split("validation")}

    def last_user(req):
        return [m["content"] for m in req.messages if m["role"] == "user"][-1]

    kinds = ["test" if any(t in last_user(r) for t in test_inputs) else
             "validation" if any(v in last_user(r) for v in val_inputs) else "other" for r in model.calls]
    assert "test" in kinds
    first_test = kinds.index("test")
    assert "validation" not in kinds[first_test:]
    assert result.test["n"] == 20


def test_budget_parsing():
    assert Budget.parse(5).evaluations == 5
    assert Budget.parse("12").evaluations == 12
    b = Budget.parse("15m")
    assert b.seconds == 900 and b.evaluations is None
    assert Budget.parse("90s").seconds == 90 and Budget.parse("1h").seconds == 3600
    for bad in ("0", "-3", "soon", "2.5", "0s"):
        with pytest.raises(UserError):
            Budget.parse(bad)


def test_bad_input_is_a_user_error(workspace, tiny):
    with pytest.raises(UserError, match="without a split"):
        optimize(workspace, "spam", "tiny:test", model=Oracle(name="o"), progress=False)
    with pytest.raises(UserError, match="unknown metric"):
        optimize(workspace, "spam", "tiny", objective="nonsense", model=Oracle(name="o"), progress=False)
    with pytest.raises(UserError, match="demo strategy"):
        optimize(workspace, "spam", "tiny", demo_strategies=("magic",), model=Oracle(name="o"), progress=False)
    save_dataset(workspace, "noval", {"train": examples(10, 0), "test": examples(10, 50)})
    with pytest.raises(UserError, match="no validation split"):
        optimize(workspace, "spam", "noval", model=Oracle(name="o"), progress=False)


def test_cli_optimize(cli, workspace, tiny):
    res = cli("optimize", "spam", "--data", "tiny", "--model", "fake", "--budget", "4", "--demos",
              "stratified,knn_tfidf", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["prompt"] == "spam" and len(data["candidates"]) == 4
    assert data["test"]["seed"]["n"] == 20
    res = cli("optimize", "spam", "--data", "tiny", "--model", "fake", "--budget", "3", "--no-test", "--demos", "none")
    assert res.exit_code == 0, res.output
    assert "optimize spam@" in res.stdout and "search cost:" in res.stdout
    assert "TEST split" not in res.stdout
    res = cli("optimize", "spam", "--data", "tiny:test", "--model", "fake")
    assert res.exit_code == 2 and "without a split" in res.stderr and "Traceback" not in res.output
    res = cli("optimize", "spam", "--data", "tiny", "--budget", "lots")
    assert res.exit_code == 2 and "--budget" in res.stderr


def test_choose_winner_prefers_the_shortest_within_the_best_interval():
    from tunelab.demos import DemoSpec
    from tunelab.optimize import Trial, choose_winner
    from tunelab.optimize.space import InstructionVariant

    def trial(i, score, lo, tokens, demos=DemoSpec("none"), status="ok"):
        return Trial(i, "demos", InstructionVariant("v", "t", "user"), demos, prompt=None, fixed_demos=[],
                     status=status, score=score, lo=lo, hi=min(1.0, score + 0.05), prompt_tokens=tokens)

    best = trial(1, 0.90, 0.82, 300)
    close = trial(2, 0.84, 0.75, 60)
    closer_but_long = trial(3, 0.88, 0.80, 200)
    far = trial(4, 0.70, 0.60, 20)
    assert choose_winner([best, close, closer_but_long, far]) == (close, best)
    assert choose_winner([best, far]) == (best, best)
    # within the interval but barely shorter (849 vs 852 tokens): not worth its lower score
    barely_shorter = trial(6, 0.83, 0.74, 295)
    assert choose_winner([best, barely_shorter]) == (best, best)
    seed = Trial(7, "seed", InstructionVariant("v", "t", "user"), DemoSpec("none"), prompt=None, fixed_demos=[],
                 status="ok", score=0.85, lo=0.77, hi=0.9, prompt_tokens=299)
    assert choose_winner([best, seed]) == (seed, best)  # the seed within the noise: nothing beat it
    # too long for the cap: neither the best nor anything over it can win
    assert choose_winner([best, close, far], max_prompt_tokens=100) == (close, close)
    assert choose_winner([best], max_prompt_tokens=100) == (None, None)
    # per-input demos compete like any other (a prompt version stores them as a selector)
    knn = trial(5, 0.99, 0.95, 100, demos=DemoSpec("knn_tfidf", k=4))
    assert choose_winner([best, knn]) == (knn, knn)
    # screened-only and rejected candidates never win
    assert choose_winner([best, trial(6, 1.0, 0.9, 10, status="screened"),
                          trial(7, 1.0, 0.9, 10, status="too_long")]) == (best, best)


def test_large_validation_screens_then_promotes(workspace):
    save_dataset(workspace, "big", {"train": examples(30, 0), "validation": examples(90, 1000)})
    (workspace.prompts_dir / "spam.prompt").write_text(SEED_PROMPT, encoding="utf-8")
    model = Sensitive(name="sensitive")
    result = optimize(workspace, "spam", "big", budget=8, model=model, demo_strategies=FAST, test=False,
                      progress=False)
    by_status = {}
    for c in result.candidates:
        by_status.setdefault(c["status"], []).append(c)
    assert result.seed["n"] == 90
    assert by_status.get("screened"), "some candidates stop after the screen"
    assert all(c["screen_score"] is not None and c["score"] is None for c in by_status["screened"])
    promoted = [c for c in by_status["ok"] if c["id"] != result.seed["id"]]
    assert promoted and all(c["n"] == 90 and c["screen_score"] is not None for c in promoted)
    assert result.winner["score"] == 1.0
    # the screen is the first third; promoted candidates reuse its answers from the cache
    screened_all = len(result.candidates) - 1
    assert len(model.calls) == 90 + 30 * screened_all + 60 * len(promoted)


def test_label_definitions_reach_the_instruction_variants(workspace, tiny, cli):
    defs = {"spam": "unsolicited advertising or a scam", "ham": "a normal personal message"}
    model = Sensitive(name="sensitive")
    result = optimize(workspace, "spam", "tiny", budget=8, model=model, label_definitions=defs, demo_strategies=(),
                      test=False, progress=False)
    texts = [c["instruction"]["text"] for c in result.candidates]
    assert any("- spam: unsolicited advertising or a scam" in t for t in texts)
    with pytest.raises(UserError, match="not a label"):
        optimize(workspace, "spam", "tiny", model=model, label_definitions={"eggs": "x"}, progress=False)
    (workspace.root / "defs.yaml").write_text("- not a mapping\n", encoding="utf-8")
    res = cli("optimize", "spam", "--data", "tiny", "--model", "fake", "--label-definitions", "defs.yaml")
    assert res.exit_code == 2 and "defs.yaml" in res.stderr and "mapping" in res.stderr


class NeighbourCopier(FakeModel):
    """Answers what the demo right before the question answered (so only nearest demos help)."""

    def _answer(self, req):
        answers = [m["content"] for m in req.messages if m["role"] == "assistant"]
        return answers[-1] if answers else "spam"


def test_nearest_demos_are_chosen_per_input(workspace, tiny):
    """A per-input candidate of the search is a PromptCandidate holding a DemoSelector: exactly what a
    committed version with `demos: {strategy: knn_tfidf}` resolves to."""
    from tunelab.demos import DemoSelector
    from tunelab.evaluate import PromptCandidate

    seed = load_prompt(workspace, "spam")
    selector = DemoSelector("knn_tfidf", 2, "tiny", tiny.version, "train", tiny.split("train"))
    cand = PromptCandidate(seed, FakeModel(), selector, free_text=False)
    a, b = cand.requests([Example("win a cash prize now", ""), Example("lunch at noon with bob", "")])
    demo_inputs = lambda req: [m["content"] for m in req.messages[1:-1] if m["role"] == "user"]  # noqa: E731
    assert all("prize" in t for t in demo_inputs(a)) and all("lunch" in t for t in demo_inputs(b))
    wider = DemoSelector("knn_tfidf", 4, "tiny", tiny.version, "train", tiny.split("train"))
    plain = PromptCandidate(seed, FakeModel(), wider, free_text=False)
    assert cand.fingerprint != plain.fingerprint  # the selector is part of what is cached and keyed


def test_a_nearest_neighbour_winner_is_committed_as_a_selector(workspace, tiny):
    model = NeighbourCopier(name="copier")
    result = optimize(workspace, "spam", "tiny", budget=12, model=model, demo_strategies=("random", "knn_tfidf"),
                      test=False, progress=False)
    assert result.improved and result.winner["demos"]["strategy"] == "knn_tfidf" and result.winner["score"] == 1.0
    assert not any("cannot be committed" in n for n in result.notes)
    k = result.winner["demos"]["k"]
    committed = load_prompt(workspace, f"spam@{result.version}")
    assert committed.demos.model_dump(exclude={"seed"}) == {
        "dataset": f"tiny@{tiny.version}", "split": "train", "strategy": "knn_tfidf", "k": k}
    assert f"Committed as spam@{result.version}" in result.message
    assert f"the {k} examples of tiny@{tiny.version}:train nearest to each input" in result.message
    (commit, *_) = prompt_log(workspace, "spam")
    assert "demos per input" in commit.message and commit.meta["optimization"]["demos"]["selector"]["k"] == k
    # the stored version asks the model exactly what the searched candidate asked, input by input
    validation = tiny.split("validation")
    selector = committed.resolve_demos(workspace)
    stored = [committed.request(ex, selector, seed=0).messages for ex in validation]
    sent = [r.messages for r in model.calls]
    assert all(msgs in sent for msgs in stored)  # each one, as the winner sent it during the search
    assert all(len([m for m in msgs if m["role"] == "assistant"]) == k for msgs in stored)
    # and nothing beats it when it is the seed
    again = optimize(workspace, "spam", "tiny", budget=6, model=NeighbourCopier(name="copier"),
                     demo_strategies=("random", "knn_tfidf"), test=False, commit=False, progress=False)
    assert again.seed["score"] == 1.0 and not again.improved


def test_a_seed_with_nearest_demos_is_scored_per_input(workspace, tiny):
    (workspace.prompts_dir / "knn.prompt").write_text(SEED_PROMPT.replace(
        "output:", "demos: {dataset: tiny, strategy: knn_tfidf, k: 2}\noutput:"), encoding="utf-8")
    result = optimize(workspace, "knn", "tiny", budget=4, model=NeighbourCopier(name="copier"),
                      demo_strategies=("random",), test=False, progress=False)
    assert result.seed["score"] == 1.0 and result.seed["demos"] == {"strategy": "seed", "k": 2}
    assert not result.improved


def test_cli_commits_a_knn_winner_and_eval_reproduces_its_score(cli, workspace, tiny, monkeypatch):
    import tunelab.models as models

    build = models._build
    monkeypatch.setattr(models, "_build", lambda spec, ws, **o: NeighbourCopier(name=spec) if spec == "copier"
                        else build(spec, ws, **o))
    models.clear_loaded()
    try:
        res = cli("optimize", "spam", "--data", "tiny", "--model", "copier", "--budget", "12", "--demos",
                  "random,knn_tfidf", "--no-test", "--json")
        assert res.exit_code == 0, res.output
        found = json.loads(res.stdout)
        assert found["improved"] and found["winner"]["demos"]["strategy"] == "knn_tfidf"
        committed = load_prompt(workspace, "spam@current")
        assert committed.version == found["version"] and committed.model == "copier"
        res = cli("eval", "spam@current", "--data", "tiny:validation", "--metric", found["objective"], "--json")
        assert res.exit_code == 0, res.output
        scored = json.loads(res.stdout)["metrics"][found["objective"]]
        assert scored["value"] == pytest.approx(found["winner"]["score"])
        assert scored["lo"] == pytest.approx(found["winner"]["lo"])
    finally:
        models.clear_loaded()
