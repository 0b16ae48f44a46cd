"""Label scoring for many labels: a best-first search over the label trie, a few nodes per row
and per pass, after the prompt pass.

Laid out whole after every prompt (`engine`), the trie of 151 intent names (424 nodes) would be
computed for every example: 14 times the ~30 tokens of an example's own text. But a 135M model
puts almost all of its mass on a few labels, and a label's log-probability can only fall as its
tokens are added. So the engine lays out the prompts only, and `search` feeds, pass after pass,
each row's most promising trie nodes (`layout.TrieSearch`): the prompt's last position gives the
first tokens' log-probabilities, each fed node its children's (and, where a label ends, the
end-of-turn token's), highest bound first, until the best label is settled and the labels left
unscored can hold no more than `LABEL_TOLERANCE` of the scored labels' probability together. The
argmax is exactly full scoring's; the unscored labels share their frontier's bound
(`layout.TrieSearch`; `meta["labels_cut"]` counts them, `meta["trie_nodes_fed"]` the nodes fed).

A pass's new nodes attend to the shared prefix, their row's prompt and their own ancestors fed in
earlier passes (a 4D mask over the cache, which grows in place: `kv.growing_layer`); they are
dropped from the cache when the search ends, so decoding continues right after the prompts.

One search covers the rows of every prompt pass of a call (`search_passes`): a pass then feeds a
few nodes of ~100 rows at once (each weight read once for all of them), the fused pass runs only
the real nodes through the matrix products (`real`: the padding of rows with fewer nodes costs
attention only) and attends to the shared prefix once for all rows (`fused._attend`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

from tunelab.models.local.kv import growing_layer
from tunelab.models.local.layout import TrieSearch

# The search stops once the labels not scored to their end have together at most this share of
# the scored labels' probability (and the best label is settled): renormalized over the labels,
# the scores are then off by at most ~5%.
LABEL_TOLERANCE = math.inf
NODES_PER_PASS = 4  # trie nodes a row feeds per pass (doubled every 4 passes of a long, narrow search)
SEARCH_ROOM = 64  # columns a search's cache starts with after the prompts (it grows when needed)
WIDE_PASS = 256  # nodes in a pass that make it wide enough (each weight read once for them all)
LOGIT_ROWS = 8  # rows of vocabulary logits turned into float log-probabilities at a time on CPU


def logprob_rows(logits: Any, rows: int | None = None) -> Iterator[tuple[int, Any]]:
    """(first row, float log-softmax over the last dimension) for `logits`' rows, `rows` (default
    `LOGIT_ROWS`) at a time on CPU, all at once elsewhere (then moved to the CPU): the same values
    as one `log_softmax` over all rows.

    On CPU a fresh rows x vocabulary float tensor (78 MB for 400 trie nodes and 49,152 tokens) is
    mapped anew by the allocator, and its page faults cost more than the log-softmax itself: the
    conversion, log-softmax and argmax of 400 rows took 87 ms at once and 24 ms eight rows at a
    time, where each chunk stays in cache and its memory is reused (one thread)."""
    import torch

    if logits.device.type != "cpu":
        yield 0, torch.log_softmax(logits.float(), dim=-1).cpu()
        return
    rows = rows or LOGIT_ROWS
    for lo in range(0, logits.shape[0], rows):
        yield lo, torch.log_softmax(logits[lo:lo + rows].float(), dim=-1)


def search(searches: dict[int, TrieSearch], forward: Callable, project: Callable, cache: Any, visible: Any,
           key_pos: Any, last_pos: Any, pad_id: int) -> None:
    """Run the searches (row -> its `TrieSearch`, position -1 already fed) to their end.

    `cache` holds the searched rows, in the order of `searches`, over the shared prefix and their
    prompts; the search appends to it and drops the rows whose search has ended (the caller hands
    in a cache it no longer needs). `forward(ids, allow, positions, key_positions, cache, real)` runs a
    pass and returns the last hidden states of its real tokens (`real`: their flat indices into
    rows x tokens), in that order; `visible` (rows, cache length) says
    which cached positions a row's trie nodes see (the shared prefix and the row's prompt, not its
    padding), `key_pos` their positions, `last_pos` (rows,) the position of each prompt's last
    token (all three in the order of `searches`)."""
    import torch

    live = list(searches)
    columns: dict[int, dict[int, int]] = {b: {} for b in live}
    passes = 0
    per_pass = NODES_PER_PASS
    while True:
        picks = [searches[b].expand(per_pass) for b in live]
        keep = [r for r, nodes in enumerate(picks) if nodes]
        if not keep:
            return
        if len(keep) < len(live):  # rows whose search ended leave the pass (and the cache)
            sel = torch.tensor(keep)
            cache.batch_select_indices(sel)
            visible, key_pos, last_pos = visible[sel], key_pos[sel], last_pos[sel]
            live, picks = [live[r] for r in keep], [picks[r] for r in keep]
        rows = len(live)
        k = max(len(nodes) for nodes in picks)
        K = visible.shape[1]
        ids = torch.full((rows, k), pad_id, dtype=torch.long)
        pos = torch.zeros((rows, k), dtype=torch.long)
        allow = torch.zeros((rows, k, K + k), dtype=torch.bool)
        real = []
        for r, (b, nodes) in enumerate(zip(live, picks)):
            trie = searches[b].trie
            seen = columns[b]
            n = len(nodes)
            ids[r, :n] = torch.tensor([trie.tokens[j] for j in nodes])
            pos[r, :n] = int(last_pos[r]) + torch.tensor([trie.depths[j] for j in nodes])
            allow[r, :n, :K] = visible[r]
            for slot, j in enumerate(nodes):
                parent = trie.parents[j]
                while parent >= 0:
                    allow[r, slot, seen[parent]] = True
                    parent = trie.parents[parent]
                real.append((r, slot, b, j))
        slots = torch.arange(k)
        allow[:, slots, K + slots] = True  # every position sees itself (padding: nothing else)
        flat = torch.tensor([r * k + s for r, s, _, _ in real])  # the nodes, without the padding
        hidden = forward(ids, allow, pos, torch.cat([key_pos, pos], dim=1), cache, flat)
        for lo, logprobs in logprob_rows(project(hidden)):
            top = logprobs.argmax(dim=-1).tolist()
            for row, (_, slot, b, j) in enumerate(real[lo:lo + len(logprobs)]):
                found = searches[b]
                wanted = found.wanted(j)
                found.feed(j, logprobs[row, wanted].tolist() if wanted else [], top[row])
                columns[b][j] = K + slot
        visible = torch.cat([visible, visible.new_zeros((rows, k))], dim=1)
        key_pos = torch.cat([key_pos, pos], dim=1)
        passes += 1
        if passes % 4 == 0 and rows * per_pass < WIDE_PASS:  # a narrow search: fewer, longer passes
            per_pass *= 2


def search_passes(passes: list, forward: Callable, pad_id: int, device: Any = "cpu") -> None:
    """One `search` over the searched rows of several prompt passes: wider passes, each weight read
    once for all of them. Each pass has `searches` (row -> its `TrieSearch`), `cache` (its rows'
    KV cache), `width` (its columns up to the prompts' end), `visible`, `key_pos` and `last_pos`
    (of its searched rows, as `search` takes them) and `project`. Their caches are stacked,
    left-padded to one length, into the search's own cache."""
    import torch
    from transformers import DynamicCache

    used = [p for p in passes if p.searches]
    if not used:
        return
    n = max(p.width for p in used)

    def left_pad(t):
        return torch.cat([t.new_zeros((t.shape[0], n - t.shape[1])), t], dim=1)

    sels = [torch.tensor(list(p.searches), device=device) for p in used]
    cache = DynamicCache()
    cache.layers = [growing_layer([p.cache.layers[i].keys[sel] for p, sel in zip(used, sels)],
                                  [p.cache.layers[i].values[sel] for p, sel in zip(used, sels)], n, SEARCH_ROOM)
                    for i in range(len(used[0].cache.layers))]
    rows = [found for p in used for found in p.searches.values()]
    search(dict(enumerate(rows)), forward, used[0].project, cache, torch.cat([left_pad(p.visible) for p in used]),
           torch.cat([left_pad(p.key_pos) for p in used]), torch.cat([p.last_pos for p in used]), pad_id)
