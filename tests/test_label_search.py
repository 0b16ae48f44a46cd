"""Many labels: the best-first search over the label trie (pure, fast) and, on SmolLM2, 151 intents
scored with the shared prefix cached and the trie searched (realmodel)."""

from __future__ import annotations

import json
import math
import random

import pytest

from tunelab.models.base import Request
from tunelab.models.local.layout import TrieSearch, build_trie

EOT = 0


def random_labels(rng: random.Random, n: int) -> list[list[int]]:
    """Token sequences (ending in EOT) with shared prefixes and labels that are prefixes of others."""
    seqs: set[tuple[int, ...]] = set()
    while len(seqs) < n:
        stem = tuple(rng.randint(1, 6) for _ in range(rng.randint(1, 4)))
        seqs.add(stem)
        seqs.add(stem + tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 3))))
    return [list(s) + [EOT] for s in sorted(seqs)[:n]]


def fake_logprobs(context: tuple[int, ...], peak: float) -> list[float]:
    """A model: a log-softmax over 10 tokens that depends on the tokens so far."""
    rng = random.Random(hash(context))
    logits = [rng.gauss(0, peak) for _ in range(10)]
    top = max(logits)
    total = math.log(sum(math.exp(x - top) for x in logits)) + top
    return [x - total for x in logits]


def run_search(seqs, tolerance: float, peak: float):
    trie = build_trie(seqs)
    search = TrieSearch(trie, tolerance)

    def context(position):  # the tokens from the prompt's end to a position
        out, node = [], position
        while node >= 0:
            out.append(trie.tokens[node])
            node = trie.parents[node]
        return tuple(reversed(out))

    def feed(position):
        lps = fake_logprobs(context(position), peak)
        search.feed(position, [lps[t] for t in search.wanted(position)], max(range(10), key=lps.__getitem__))

    feed(-1)
    while nodes := search.expand(3):
        for j in nodes:
            feed(j)
    exact = [sum(fake_logprobs(tuple(seq[:i]), peak)[seq[i]] for i in range(len(seq))) for seq in seqs]
    return search, exact


@pytest.mark.parametrize("seed", range(20))
def test_search_finds_the_argmax_of_full_scoring_and_scores_near_labels_exactly(seed):
    rng = random.Random(seed)
    seqs = random_labels(rng, rng.randint(5, 40))
    search, exact = run_search(seqs, math.inf, peak=3.0)
    scores, cut = search.scores()
    best = max(range(len(seqs)), key=exact.__getitem__)
    assert max(range(len(seqs)), key=scores.__getitem__) == best
    assert scores[best] == pytest.approx(exact[best])
    for k in search.done:  # every label scored to its end has its exact score
        assert scores[k] == pytest.approx(exact[k])
    assert cut == len(seqs) - len(search.done)
    # the labels not scored to their end share an upper bound of their mass
    assert sum(math.exp(s) for k, s in enumerate(scores) if k not in search.done) >= \
        sum(math.exp(e) for k, e in enumerate(exact) if k not in search.done) - 1e-9


def test_search_prunes_a_peaked_distribution_and_tolerance_zero_scores_everything():
    seqs = random_labels(random.Random(7), 60)
    peaked, _ = run_search(seqs, math.inf, peak=4.0)
    assert sum(peaked.fed) < len(peaked.trie.tokens) // 2 and peaked.scores()[1] > 0
    full, exact = run_search(seqs, 0.0, peak=4.0)
    assert all(full.fed) and full.scores() == (pytest.approx(exact), 0)
    some, _ = run_search(seqs, 0.05, peak=4.0)  # in between: the unscored labels hold <= 5% of the mass
    scored = sum(math.exp(v) for v in some.done.values())
    unscored = sum(math.exp(s) for k, s in enumerate(some.scores()[0]) if k not in some.done)
    assert unscored <= 0.05 * scored + 1e-12
    assert sum(peaked.fed) <= sum(some.fed) <= sum(full.fed)


@pytest.mark.parametrize("shape,rows", [((21, 300), 8), ((5, 3, 300), 1), ((4, 300), None)])
def test_logprob_rows_are_one_log_softmax_a_few_rows_at_a_time(shape, rows):
    import torch

    from tunelab.models.local.labels import logprob_rows

    logits = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 4).bfloat16()
    chunks = list(logprob_rows(logits, rows))
    assert [lo for lo, _ in chunks] == list(range(0, shape[0], rows or 8))
    assert all(lp.dtype == torch.float32 for _, lp in chunks)
    assert torch.equal(torch.cat([lp for _, lp in chunks]), torch.log_softmax(logits.float(), dim=-1))


# -- SmolLM2, 151 intents ---------------------------------------------------------------------


def separate_label_logprobs(model, messages, labels: list[str]) -> list[float]:
    """Each label scored on its own: one request per label (a one-label trie after the prompt, no
    search), all in one call so the prompt's cache is shared."""
    results = model.complete([Request(messages=messages, labels=[label]) for label in labels])
    return [r.meta["label_logprobs_raw"][label] for r, label in zip(results, labels)]


@pytest.mark.realmodel
def test_151_intents_search_shared_prefix_and_same_argmax_as_separate_scoring(fp32_model, shared_data):
    folder = shared_data / "clinc150"
    labels = (folder / "labels.txt").read_text().split()
    assert len(labels) >= 100
    examples = [json.loads(line)["input"] for line in (folder / "test.jsonl").read_text().splitlines()[:2]]
    system = f"Classify the user's request into one of these intents: {', '.join(labels)}. Answer with the intent only."
    requests = [Request(messages=[{"role": "system", "content": system}, {"role": "user", "content": text}],
                        labels=labels) for text in examples]
    searched = fp32_model.complete(requests)
    trie = build_trie([[*t, EOT] for t in fp32_model.tokenizer(labels, add_special_tokens=False)["input_ids"]])
    assert any(p > 0 for p in trie.parents)  # labels share prefixes (e.g. "reset_settings", "restaurant_...")
    for req, got in zip(requests, searched):
        separate = separate_label_logprobs(fp32_model, req.messages, labels)
        best = max(range(len(labels)), key=separate.__getitem__)
        assert got.text == labels[best]
        raw = got.meta["label_logprobs_raw"]
        assert raw[labels[best]] == pytest.approx(separate[best], abs=2e-3)
        # the search fed part of the trie; the labels it scored to their end have their exact scores
        exact = sum(abs(raw[label] - s) < 2e-3 for label, s in zip(labels, separate))
        assert exact >= len(labels) - got.meta["labels_cut"] > 1
        assert 0 < got.meta["trie_nodes_fed"] < len(trie.tokens)
        assert got.meta["shared_prefix_tokens"] > 500  # the instruction and the label list ran once
        assert math.isclose(sum(math.exp(v) for v in got.label_logprobs.values()), 1.0, rel_tol=1e-6)


@pytest.mark.realmodel
def test_search_without_a_shared_prefix_packs_its_nodes_and_keeps_the_argmax(fp32_model, shared_data):
    """Prompts that share no prefix worth caching (a mixed call): the search's packed nodes attend
    to their rows' caches only, with the same argmax as scoring each label on its own."""
    folder = shared_data / "clinc150"
    labels = (folder / "labels.txt").read_text().split()
    text = json.loads((folder / "test.jsonl").read_text().splitlines()[0])["input"]
    listed = ", ".join(labels)
    requests = [Request(messages=[{"role": "system", "content": system}, {"role": "user", "content": text}],
                        labels=labels)
                for system in (f"Intents: {listed}. Answer with the intent only.",
                               f"Pick the user's intent among {listed}; answer with it alone.")]
    searched = fp32_model.complete(requests)
    for req, got in zip(requests, searched):
        assert got.meta["shared_prefix_tokens"] == 0 and 0 < got.meta["trie_nodes_fed"]
        separate = separate_label_logprobs(fp32_model, req.messages, labels)
        best = max(range(len(labels)), key=separate.__getitem__)
        assert got.text == labels[best]
        assert got.meta["label_logprobs_raw"][labels[best]] == pytest.approx(separate[best], abs=2e-3)
