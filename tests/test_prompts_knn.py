"""Per-input few-shot demos in a prompt version (`demos: {strategy: knn_tfidf|knn_embed, ...}`):
validation with field names, deterministic selection that never shows an input its own example,
rendering through a DemoSelector, errors naming the file and field, commit/load, the shared index,
and the gateway serving such a prompt. Fake models and TF-IDF only (no encoder is loaded)."""

from __future__ import annotations

import pytest

from tunelab.datasets import Example, save_dataset
from tunelab.errors import NotFound, UserError
from tunelab.models.fake import FakeModel
from tunelab.demos import DemoSelector
from tunelab.files import write_atomic
from tunelab.prompts import DemoSource, commit_prompt, load_prompt, parse_prompt, prompt_path

TRAIN = [
    Example("cheap pills online pharmacy", "spam"),
    Example("lunch at noon tomorrow with bob", "ham"),
    Example("win a cash prize now", "spam"),
    Example("meeting moved to friday afternoon", "ham"),
    Example("free cash prize claim now", "spam"),
    Example("dinner with bob at seven", "ham"),
]

KNN = """---
output: {type: label, labels: [spam, ham]}
demos: {dataset: sms, split: train, strategy: knn_tfidf, k: 2}
---
system:
Classify the message.
user:
{{ input }}
"""


@pytest.fixture
def sms(workspace):
    ds = save_dataset(workspace, "sms", {"train": TRAIN, "test": [Example("see you at noon", "ham")]})
    write_atomic(prompt_path(workspace, "knn"), KNN)
    return ds


def demo_inputs(messages):
    """The user turns between the system part and the question: the demos' inputs."""
    return [m["content"] for m in messages[1:-1] if m["role"] == "user"]


def test_front_matter_accepts_the_knn_strategies():
    p = parse_prompt(KNN, "t")
    assert isinstance(p.demos, DemoSource) and p.demos.per_input and p.demos.k == 2
    embed = parse_prompt(KNN.replace("knn_tfidf", "knn_embed"), "t")
    assert embed.demos.strategy == "knn_embed" and embed.version != p.version
    assert not parse_prompt(KNN.replace("knn_tfidf", "stratified"), "t").demos.per_input


@pytest.mark.parametrize("demos, field, words", [
    ("{dataset: sms, strategy: knn_cosine, k: 2}", "demos.strategy", "knn_tfidf"),
    ("{dataset: sms, strategy: knn_tfidf, k: 0}", "demos.k", "at least 1"),
    ("{dataset: sms, strategy: knn_embed, k: 99}", "demos.k", "64"),
    ("{dataset: sms, strategy: knn_tfidf, k: 2, seed: 3}", "demos.seed", "takes no seed"),
])
def test_bad_selector_settings_name_the_field(demos, field, words):
    text = KNN.replace("{dataset: sms, split: train, strategy: knn_tfidf, k: 2}", demos)
    with pytest.raises(UserError) as err:
        parse_prompt(text, "t", path="prompts/t.prompt")
    message = str(err.value)
    assert message.startswith("prompts/t.prompt:3: field '" + field + "'") and words in message
    assert "\n" not in message


def test_selector_picks_the_nearest_per_input_deterministically(workspace, sms):
    p = load_prompt(workspace, "knn")
    sel = p.resolve_demos(workspace)
    assert isinstance(sel, DemoSelector) and len(sel) == 2
    prize = sel.select(Example("claim your cash prize", ""))
    bob = sel.select(Example("drinks with bob tonight", ""))
    assert {d.output for d in prize} == {"spam"} and {d.output for d in bob} == {"ham"}
    assert prize[-1].input == "free cash prize claim now"  # the nearest one last, next to the question
    # the same answer from a fresh prompt object and in a batch (the index is shared, the memo too)
    again = load_prompt(workspace, "knn").resolve_demos(workspace)
    assert again.index is sel.index
    assert again.select(Example("claim your cash prize", "")) == prize
    assert sel.select_many([Example("drinks with bob tonight", ""), Example("claim your cash prize", "")]) == [bob, prize]
    with pytest.raises(TypeError, match="per input"):
        list(sel)


def test_ties_go_to_the_earlier_example_and_an_input_is_never_its_own_demo(workspace):
    from tunelab.demos import NearestDemos

    pool = [Example("alpha beta", "first"), Example("alpha beta", "second"), Example("gamma delta", "third")]
    index = NearestDemos(pool, "tfidf")
    assert [d.output for d in index.select(Example("alpha beta gamma", ""), 1)] == ["first"]
    # a pool example asked about itself: its own text never comes back, its twins do
    for ex in TRAIN:
        sel = NearestDemos(TRAIN, "tfidf").select(ex, 5)
        assert len(sel) == 5 and ex.input not in [d.input for d in sel]
    assert all(d.input != "alpha beta" for d in index.select(Example("alpha beta", ""), 3))


def test_render_and_request_select_per_example(workspace, sms):
    p = load_prompt(workspace, "knn")
    sel = p.resolve_demos(workspace)
    msgs = p.render(Example("claim your cash prize", ""), sel)
    assert demo_inputs(msgs) == [d.input for d in sel.select(Example("claim your cash prize", ""))]
    assert [m["content"] for m in msgs if m["role"] == "assistant"] == ["spam", "spam"]
    assert p.render("claim your cash prize") == msgs  # demos=None: the prompt's own selector
    req = p.request(Example("drinks with bob tonight", ""), sel, seed=3)
    assert req.labels == ["spam", "ham"] and req.seed == 3
    assert [m["content"] for m in req.messages if m["role"] == "assistant"] == ["ham", "ham"]
    # a training example rendered with a selector over its own split (a fine-tune's data) never
    # shows itself as a demo
    for ex in TRAIN:
        assert ex.input not in demo_inputs(p.render(ex, sel))


def test_missing_dataset_split_or_too_large_k_name_the_prompt_file_and_field(workspace, sms):
    cases = [("sms", "nosuch", NotFound, "unknown dataset 'nosuch'"),
             ("split: train", "split: validation", NotFound, "has no split 'validation'"),
             ("k: 2", "k: 7", UserError, "k 7 is larger than the 6 examples")]
    for old, new, kind, words in cases:
        write_atomic(prompt_path(workspace, "bad"), KNN.replace(old, new, 1))
        with pytest.raises(kind) as err:
            load_prompt(workspace, "bad").resolve_demos(workspace)
        message = str(err.value)
        assert message.startswith("prompts/bad.prompt:3: field 'demos") and words in message, message
        assert "\n" not in message


def test_commit_and_load_roundtrip(workspace, sms, cli):
    version = commit_prompt(workspace, "knn", "nearest demos")
    stored = load_prompt(workspace, f"knn@{version}")
    assert stored.version == version and stored.demos == load_prompt(workspace, "knn").demos
    assert parse_prompt(stored.to_text(), "knn").version == version
    sel = stored.resolve_demos()
    assert sel.to_dict() == {"strategy": "knn_tfidf", "dataset": f"sms@{sms.version}", "split": "train", "k": 2}
    # k, the strategy and the dataset version are all in the content hash (and so in the
    # evaluator's fingerprint and every cache key derived from the prompt version)
    versions = {parse_prompt(KNN.replace(a, b), "knn").version
                for a, b in (("k: 2", "k: 2"), ("k: 2", "k: 3"), ("knn_tfidf", "knn_embed"),
                             ("sms,", f"sms@{sms.version},"))}
    assert len(versions) == 4
    res = cli("prompt", "check", "knn", "--data", "sms")
    assert res.exit_code == 0, res.output


def test_the_evaluator_keeps_a_selector(workspace, sms):
    """PromptCandidate (tunelab.evaluate) must keep a DemoSelector instead of listing it."""
    from tunelab.evaluate import PromptCandidate, evaluate

    p = load_prompt(workspace, "knn")
    try:
        cand = PromptCandidate(p, FakeModel(), workspace=workspace, free_text=False)
        fingerprint = cand.fingerprint
    except TypeError as exc:
        pytest.xfail(f"tunelab.evaluate.PromptCandidate lists its demos: {exc}")
    assert isinstance(cand.demos, DemoSelector)
    (req,) = cand.requests([Example("claim your cash prize", "")])
    assert demo_inputs(req.messages) == [d.input for d in cand.demos.select(Example("claim your cash prize", ""))]
    other = PromptCandidate(p.replace(demos={"dataset": "sms", "strategy": "knn_tfidf", "k": 3}), FakeModel(),
                            workspace=workspace, free_text=False)
    assert other.fingerprint != fingerprint
    result = evaluate(workspace, cand, "sms:test", progress=False)
    assert result.rows == 1


class NeighbourCopier(FakeModel):
    """Answers what the demo right before the question answered: right only with nearest demos."""

    def _answer(self, req):
        answers = [m["content"] for m in req.messages if m["role"] == "assistant"]
        return answers[-1] if answers else "spam"


def test_the_gateway_serves_a_knn_prompt(workspace, sms, monkeypatch):
    from fastapi.testclient import TestClient

    import tunelab.models as models
    from tunelab.server.app import create_app
    from tunelab.server.auth import create_key
    from tunelab.lifecycle.calls import list_calls

    write_atomic(prompt_path(workspace, "knn"), KNN.replace("---\noutput", "---\nmodel: copier\noutput"))
    commit_prompt(workspace, "knn", "nearest demos")
    build = models._build
    monkeypatch.setattr(models, "_build", lambda spec, ws, **o: NeighbourCopier(name=spec) if spec == "copier"
                        else build(spec, ws, **o))
    models.clear_loaded()
    _, key = create_key(workspace, "svc", "admin")
    client = TestClient(create_app(workspace))
    answers = {}
    for text in ("claim your cash prize", "drinks with bob tonight"):
        r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json={
            "model": "knn@current", "messages": [{"role": "user", "content": text}]})
        assert r.status_code == 200, r.text
        answers[text] = r.json()["choices"][0]["message"]["content"]
    models.clear_loaded()
    assert answers == {"claim your cash prize": "spam", "drinks with bob tonight": "ham"}
    assert [c.status for c in list_calls(workspace)] == ["ok", "ok"]


def test_free_weights_drops_the_embedding_model_and_it_loads_again():
    """The MiniLM model of knn_embed (and baseline:embed) goes with the LLMs' weights between the
    flow's steps; the next embedding loads it again and gives the same vectors."""
    import numpy as np

    from tunelab import demos
    from tunelab.models import free_weights

    first = demos.embed(["reset my password", "my card was charged twice"])
    assert demos._EMBED_MODEL is not None
    free_weights()
    assert demos._EMBED_MODEL is None
    again = demos._embed_batches(["reset my password", "my card was charged twice"], 64)  # not the memo
    assert demos._EMBED_MODEL is not None
    assert np.allclose(first, again) and first.shape == (2, 384)


def test_embeddings_are_remembered_per_text_batched_and_alone(monkeypatch):
    """A train split embedded for the nearest-neighbour demos is not embedded again for
    baseline:embed or a learning curve's sample; an input embedded on its own keeps its own vector
    (the same as a fresh one, wherever it is asked for)."""
    import numpy as np

    from tunelab import demos

    calls: list[list[str]] = []
    real = demos._embed_batches

    def counting(texts, batch_size):
        calls.append(list(texts))
        return real(texts, batch_size)

    monkeypatch.setattr(demos, "_embed_batches", counting)
    monkeypatch.setattr(demos, "_POOLED", {})
    monkeypatch.setattr(demos, "_ALONE", {})
    pool = ["reset my password", "my card was charged twice", "the app crashes on start", "reset my password"]
    vectors = demos.embed(pool)
    assert calls == [pool[:3]] and vectors.shape == (4, 384)  # a repeated text is embedded once
    assert np.array_equal(vectors[0], vectors[3])
    sample = demos.embed([pool[2], pool[0]])
    assert len(calls) == 1 and np.array_equal(sample, vectors[[2, 0]])
    alone = demos.embed_one(pool[1])  # alone: its own computation, remembered apart from the batched one
    assert calls[-1] == [pool[1]] and np.array_equal(alone, real([pool[1]], 1)[0])
    assert demos.embed_one(pool[1]) is alone and len(calls) == 2
    assert np.allclose(alone, vectors[1], atol=1e-5)  # padding beside other inputs: float rounding only
