"""A big call runs as two shards at once, one thread each (`Engine._run_sharded`): the same answers
as one shard, the threads given back, a shard's error raised on the caller's thread."""

from __future__ import annotations

import json

import pytest

from tunelab.errors import UserError
from tunelab.models.base import Request
from tunelab.models.local.engine import MIN_SHARD_REQUESTS, call_shards


def test_call_shards_reads_the_environment(monkeypatch):
    monkeypatch.delenv("TUNELAB_SHARDS", raising=False)
    assert call_shards() == 2
    monkeypatch.setenv("TUNELAB_SHARDS", "1")
    assert call_shards() == 1
    monkeypatch.setenv("TUNELAB_SHARDS", "0")
    assert call_shards() == 1
    monkeypatch.setenv("TUNELAB_SHARDS", "two")
    with pytest.raises(UserError, match="TUNELAB_SHARDS='two': expected a whole number"):
        call_shards()


def _requests(shared_data) -> list[Request]:
    """Every kind a sharded call mixes: two labels with their free answers, 151 searched intents with
    theirs, and free text."""
    folder = shared_data / "clinc150"
    intents = (folder / "labels.txt").read_text().split()
    texts = [json.loads(line)["input"] for line in (folder / "test.jsonl").read_text().splitlines()[:8]]
    system = "Classify the user's request into one intent. Answer with the intent only."
    many = [Request(messages=[{"role": "system", "content": system}, {"role": "user", "content": t}],
                    labels=intents, free_text=True, max_tokens=8) for t in texts]
    two = [Request(messages=[{"role": "user", "content": f"Is this about money? Answer yes or no.\n\n{t}"}],
                   labels=["yes", "no"], free_text=True, max_tokens=4) for t in texts]
    free = [Request(messages=[{"role": "user", "content": f"Rewrite politely: {t}"}], max_tokens=10) for t in texts]
    return many + two + free


@pytest.mark.realmodel
def test_a_sharded_call_answers_as_one_shard(fp32_model, shared_data, monkeypatch):
    import torch

    requests = _requests(shared_data)
    assert len(requests) >= MIN_SHARD_REQUESTS
    threads = torch.get_num_threads()
    if threads < 2:
        torch.set_num_threads(2)
    try:
        monkeypatch.setenv("TUNELAB_SHARDS", "1")
        one = fp32_model.complete(requests)
        monkeypatch.setenv("TUNELAB_SHARDS", "2")
        two = fp32_model.complete(requests)
        assert torch.get_num_threads() == max(threads, 2)  # the shards' one-thread setting is undone
    finally:
        torch.set_num_threads(threads)
    assert all("shards" not in r.meta for r in one) and all(r.meta["shards"] == 2 for r in two)
    for a, b in zip(one, two):
        assert a.text == b.text and a.free_text == b.free_text
        if a.label_logprobs:
            raw_a, raw_b = a.meta["label_logprobs_raw"], b.meta["label_logprobs_raw"]
            # fp32: only the batches' padding differs (labels the search cut are bounds, equal too)
            assert all(raw_a[k] == pytest.approx(raw_b[k], abs=1e-3) for k in raw_a)
        else:
            assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-3)
        assert b.latency_s > 0
    # a request's latency is its share of the machine: summed, about the call's wall time, not twice it
    assert sum(r.latency_s for r in two) < 1.5 * sum(r.latency_s for r in one)


@pytest.mark.realmodel
def test_a_shards_error_reaches_the_caller_and_the_threads_are_given_back(fp32_model, shared_data, monkeypatch):
    import torch

    from tunelab.models.local.engine import Engine

    def broken(self, jobs, prefix):
        raise RuntimeError(f"shard of {len(jobs)} failed")

    monkeypatch.setattr(Engine, "_run_jobs", broken)
    monkeypatch.setenv("TUNELAB_SHARDS", "2")
    threads = torch.get_num_threads()
    if threads < 2:
        torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="shard of 12 failed"):
            fp32_model.complete(_requests(shared_data))
        assert torch.get_num_threads() == max(threads, 2)
    finally:
        torch.set_num_threads(threads)
