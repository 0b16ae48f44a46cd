"""Where a batch's tokens go, without torch: grouping requests into passes, the prefix they
share, the trie of the labels' tokens, the greedy label read off a scoring pass, and where an
answer stops (a stop string, or the end of the first JSON value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_BATCH = 64  # rows of a prompt pass


def make_batches(lengths: list[int], token_budget: int, max_batch: int = MAX_BATCH,
                 overhead: int = 0) -> list[list[int]]:
    """Indices grouped into batches of neighbours in length, longest first. A batch holds at most
    `max_batch` items and `token_budget` padded tokens (its size x its longest item; an item
    longer than the budget gets a batch of its own). Of those groupings it returns the cheapest, a
    batch costing `overhead` + its padded tokens: `overhead` is a pass's fixed cost in tokens (every
    weight read once, every operation launched), so that a few padding tokens buy one pass fewer.
    At equal cost, fewer batches.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    longest = [lengths[i] for i in order]
    n = len(order)
    best: list[tuple[int, int]] = [(0, 0)] + [(2**62, 0)] * n  # (cost, batches) of the first k items
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for begin in range(end - 1, max(-1, end - 1 - max_batch), -1):
            padded = (end - begin) * longest[begin]
            if end - begin > 1 and padded > token_budget:
                break  # earlier items are longer: the padded size only grows
            cost = (best[begin][0] + overhead + padded, best[begin][1] + 1)
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    batches: list[list[int]] = []
    end = n
    while end:
        batches.append(order[cut[end]:end])
        end = cut[end]
    return batches[::-1]


def common_prefix_len(sequences: list[list[int]]) -> int:
    """Length of the longest prefix all sequences share."""
    if not sequences:
        return 0
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for k in range(n):
        tok = first[k]
        if any(s[k] != tok for s in sequences):
            return k
    return n


def find_stop(text: str, stops: list[str] | None) -> int | None:
    """Where the earliest stop string begins in `text`, or None."""
    found = [pos for pos in (text.find(s) for s in (stops or []) if s) if pos >= 0]
    return min(found) if found else None


def json_end(text: str) -> int | None:
    """The index just past the first balanced JSON object or array in `text`, or None while it
    is still open. Brackets inside JSON strings (with escapes) do not count."""
    depth = 0
    in_string = escaped = False
    for i, ch in enumerate(text):
        if depth == 0:
            if ch in "{[":
                depth = 1
            continue
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def trim_output(text: str, stops: list[str] | None, want_json: bool) -> tuple[str, bool]:
    """The answer cut at the first stop string and, for JSON, after the first balanced value.
    Returns (text, whether it was cut)."""
    cut = find_stop(text, stops)
    if cut is not None:
        text = text[:cut]
    if want_json:
        end = json_end(text)
        if end is not None and end < len(text):
            return text[:end], True
    return text, cut is not None


@dataclass
class LabelTrie:
    """The labels' token sequences as a trie. Node j holds token `tokens[j]`, its parent is
    `parents[j]` (-1: the prompt's last position) and its depth `depths[j]` (1 for a first
    token). `paths[k]` lists, for label k, the position whose next-token distribution predicts
    each of its tokens (-1: the prompt's last position, else a node), with `targets[k]` the tokens."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    paths: list[list[int]]
    targets: list[list[int]]
    sees: Any = None  # ancestry() as a bool tensor, set by the backend
    edges: Any = None  # trie_edges(), made on first use

    def ancestry(self) -> list[list[bool]]:
        """sees[j][k]: node j may attend to node k (k is j or one of its ancestors)."""
        sees: list[list[bool]] = []
        for j, parent in enumerate(self.parents):
            row = list(sees[parent]) if parent >= 0 else [False] * len(self.tokens)
            row[j] = True
            sees.append(row)
        return sees


def build_trie(sequences: list[list[int]]) -> LabelTrie:
    """Trie of the given token sequences. Each sequence's last token is only predicted, never fed,
    so it makes no node."""
    children: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    paths: list[list[int]] = []
    for seq in sequences:
        path = [-1]
        node = -1
        for depth, tok in enumerate(seq[:-1], start=1):
            key = (node, tok)
            if key not in children:
                children[key] = len(tokens)
                tokens.append(tok)
                parents.append(node)
                depths.append(depth)
            node = children[key]
            path.append(node)
        paths.append(path)
    return LabelTrie(tokens, parents, depths, paths, [list(s) for s in sequences])


def greedy_label(trie: LabelTrie, label_lengths: list[int], top: list[int], stop_ids: set[int],
                 max_new: int) -> tuple[int, list[int]] | None:
    """The free (greedy) answer read off the label-scoring pass, when greedy decoding would write
    one of the labels: `top[0]` is the most likely token after the prompt, `top[j + 1]` the one
    after trie node j. Label k is the greedy answer when the argmax follows its tokens and then
    picks a stop token (or `max_new` tokens are reached first). Returns (k, the tokens greedy
    decoding generates), or None when greedy leaves the labels (then it has to be generated)."""
    for k, (path, target) in enumerate(zip(trie.paths, trie.targets)):
        n = label_lengths[k]
        m = min(n, max_new)
        tokens = target[:m]
        if any(t in stop_ids for t in tokens):
            continue
        if any(top[path[i] + 1] != tokens[i] for i in range(m)):
            continue
        if m == n < max_new and top[path[n] + 1] not in stop_ids:
            continue
        return k, tokens
    return None


class TrieSearch:
    """Best-first scoring of one request's label trie, for tries too big to lay out whole after
    every prompt (many labels). A position (-1: the prompt's last one, else a trie node) is *fed*
    once the model has run it, which gives the log-probabilities of its children's tokens (and of
    the final token of the labels that end there). A node's `bound` is the log-probability of its
    path: the labels through it have at most that much probability together, as they are disjoint
    continuations of it.

    `expand(k)` picks the k unfed nodes with the highest bound whose parent is fed (the frontier),
    until (a) the best fully scored label is at least every frontier bound, so it is the argmax
    full scoring gives, and (b) the frontier's mass (the sum of its bounds' probabilities, at
    least what the labels not scored to their end have together) is at most `tolerance` times the
    scored labels' mass. A label not scored to its end gets an even share of its frontier node's
    mass: label log-probabilities renormalized over the labels are off by at most that tolerance.
    `tolerance=0` scores every label exactly."""

    def __init__(self, trie: LabelTrie, tolerance: float):
        n = len(trie.tokens)
        self.trie, self.tolerance = trie, tolerance
        self.fed = [False] * n
        self.bound: list[float | None] = [None] * n
        self.top = [-1] * (n + 1)  # argmax token after each fed position (-1: not fed), as `greedy_label` reads it
        self.done: dict[int, float] = {}
        self.best = float("-inf")
        self.children, self.ends = trie_edges(trie)

    def wanted(self, position: int) -> list[int]:
        """The tokens whose log-probabilities `feed(position, ...)` needs, in order."""
        return ([self.trie.tokens[j] for j in self.children[position + 1]]
                + [token for _, token in self.ends[position + 1]])

    def feed(self, position: int, logprobs: list[float], top: int) -> None:
        """Record a fed position: `logprobs` of `wanted(position)`, `top` its argmax token."""
        base = 0.0 if position < 0 else self.bound[position]
        kids = self.children[position + 1]
        for j, lp in zip(kids, logprobs):
            self.bound[j] = base + lp
        for (k, _), lp in zip(self.ends[position + 1], logprobs[len(kids):]):
            self.done[k] = base + lp
            self.best = max(self.best, base + lp)
        if position >= 0:
            self.fed[position] = True
        self.top[position + 1] = top

    def frontier(self) -> list[int]:
        return [j for j, b in enumerate(self.bound) if b is not None and not self.fed[j]]

    def expand(self, k: int) -> list[int]:
        """The next nodes to feed: at most k, highest bound first; [] when the search is over."""
        ready = sorted(self.frontier(), key=lambda j: -self.bound[j])
        if not ready:
            return []
        if self.done and math.isinf(self.tolerance) or self._mass_settled(ready):
            ready = [j for j in ready if self.bound[j] > self.best]  # only what could still beat the best
        return ready[:k]

    def _mass_settled(self, ready: list[int]) -> bool:
        """Whether the frontier holds at most `tolerance` of the scored labels' mass."""
        if not self.done:
            return False
        scored = sum(math.exp(v - self.best) for v in self.done.values())
        return sum(math.exp(self.bound[j] - self.best) for j in ready) <= self.tolerance * scored

    def scores(self) -> tuple[list[float], int]:
        """Every label's score (exact, or its share of its frontier node's mass) and how many
        labels were not scored to their end."""
        cut: dict[int, list[int]] = {}
        for k, path in enumerate(self.trie.paths):
            if k not in self.done:
                node = next(p for p in path[1:] if not self.fed[p])
                cut.setdefault(node, []).append(k)
        out = [self.done.get(k, 0.0) for k in range(len(self.trie.paths))]
        for node, labels in cut.items():
            for k in labels:
                out[k] = self.bound[node] - math.log(len(labels))
        return out, sum(len(labels) for labels in cut.values())


def trie_edges(trie: LabelTrie) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Per position (index 0: the prompt's last one, j + 1: node j): its child nodes, and the
    (label, final token) of the labels whose last fed position it is (cached on the trie)."""
    cached = trie.edges
    if cached is None:
        children: list[list[int]] = [[] for _ in range(len(trie.tokens) + 1)]
        for j, parent in enumerate(trie.parents):
            children[parent + 1].append(j)
        ends: list[list[tuple[int, int]]] = [[] for _ in range(len(trie.tokens) + 1)]
        for k, (path, target) in enumerate(zip(trie.paths, trie.targets)):
            ends[path[-1] + 1].append((k, target[-1]))
        cached = trie.edges = (children, ends)
    return cached
