"""Splitting and sampling examples: the one way tunelab holds data out or takes a share of it.

    splits = split_examples(examples, test=0.1, validation=0.1, seed=0)   # seeded, stratified, no leaks
    ds = split_dataset(workspace, "support", test=0.1, validation=0.1)      # a new version
    few = subsample(examples, 40, seed=0)                                   # seeded, stratified, in order

Every split and sample is stratified by label when the outputs are labels, seeded, and depends on
the examples' content, not their order. Fine-tuning holds out its validation examples with
`split_examples` too, and takes `max_examples` with `subsample`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from typing import TYPE_CHECKING

from tunelab.datasets.check import check_examples
from tunelab.datasets.examples import SPLITS, Dataset, Example, get_dataset, infer_labels, normalize_input, save_dataset
from tunelab.errors import UserError

if TYPE_CHECKING:
    from tunelab.workspace import Workspace


def _allocate(n: int, test: float, validation: float) -> tuple[int, int]:
    """How many of `n` go to test and validation: rounded shares, at least one each when n >= 3."""
    n_test, n_val = int(n * test + 0.5), int(n * validation + 0.5)
    if n >= 3:
        n_test = max(n_test, 1) if test > 0 else 0
        n_val = max(n_val, 1) if validation > 0 else 0
    elif n == 2:
        n_test, n_val = (1, 0) if test > 0 else (0, 1 if validation > 0 else 0)
    else:
        n_test = n_val = 0
    while n_test + n_val > n - 1 and n_test + n_val > 0:  # keep at least one for train
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_test, n_val


def split_examples(examples: list[Example], *, test: float = 0.1, validation: float = 0.1,
                   seed: int = 0) -> dict[str, list[Example]]:
    """Seeded train/validation/test splits, stratified by label when outputs are labels.
    Examples with the same (normalized) input stay together, so a split never leaks into another."""
    if not (0 <= test < 1 and 0 <= validation < 1 and test + validation < 1):
        raise UserError(f"split fractions must be in [0, 1) with test + validation < 1 (got test={test}, "
                        f"validation={validation})")
    labels = infer_labels(examples)
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        groups[normalize_input(ex.input)].append(ex)
    strata: dict[str, list[str]] = defaultdict(list)
    for key, exs in groups.items():
        strata[Counter(e.output for e in exs).most_common(1)[0][0] if labels else ""].append(key)
    rng = random.Random(seed)
    out: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
    for stratum in sorted(strata):
        # order by a content hash first, so the result depends on the content and seed, not the input order
        keys = sorted(strata[stratum], key=lambda k: hashlib.sha256(k.encode()).hexdigest())
        rng.shuffle(keys)
        n_test, n_val = _allocate(len(keys), test, validation)
        for j, key in enumerate(keys):
            target = "test" if j < n_test else "validation" if j < n_test + n_val else "train"
            out[target].extend(groups[key])
    for exs in out.values():
        exs.sort(key=lambda e: hashlib.sha256(json.dumps(e.to_dict(), sort_keys=True).encode()).hexdigest())
        rng.shuffle(exs)
    return {k: v for k, v in out.items() if v}


def split_dataset(workspace: "Workspace", ref: str, *, test: float = 0.1, validation: float = 0.1,
                  seed: int = 0, name: str | None = None) -> Dataset:
    """A new version of `ref` (all its examples pooled) with seeded, stratified splits."""
    ds = get_dataset(workspace, ref)
    ordered = [s for s in SPLITS if s in ds.splits] + [s for s in ds.splits if s not in SPLITS]
    pool = [ex for s in ordered for ex in ds.splits[s]]
    splits = split_examples(pool, test=test, validation=validation, seed=seed)
    report = check_examples(splits, source=f"{name or ds.name} (split of {ds.ref})", format="dataset")
    meta = {**ds.meta, "split_from": ds.ref, "split": {"seed": seed, "test": test, "validation": validation}}
    return save_dataset(workspace, name or ds.name, splits, source=f"split of {ds.ref}", check=report.to_dict(),
                        meta=meta)


def holdout(examples: list[Example], share: float = 0.1, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(kept, held out): `share` of the examples held out as `split_examples` would make a
    validation split (seeded, stratified, no input on both sides)."""
    parts = split_examples(examples, test=0.0, validation=share, seed=seed)
    return parts.get("train", []), parts.get("validation", [])


def subsample(examples: list[Example], n: int | None, seed: int = 0) -> list[Example]:
    """At most `n` of `examples`, in their order: a seeded sample, stratified by label when the
    outputs are labels (every label keeps its share, and at least one example while n allows)."""
    if n is None or n >= len(examples):
        return list(examples)
    if n <= 0:
        return []
    labels = infer_labels(examples)
    rng = random.Random(seed)
    if not labels:
        keep = set(rng.sample(range(len(examples)), n))
    else:
        by_label: dict[str, list[int]] = defaultdict(list)
        for i, ex in enumerate(examples):
            by_label[ex.output].append(i)
        for idx in by_label.values():
            rng.shuffle(idx)
        # labels in turn, each shuffled: every label gets one before any gets two
        order = sorted(by_label, key=lambda label: (-len(by_label[label]), label))
        keep = set()
        depth = 0
        while len(keep) < n:
            for label in order:
                if depth < len(by_label[label]) and len(keep) < n:
                    keep.add(by_label[label][depth])
            depth += 1
    return [ex for i, ex in enumerate(examples) if i in keep]
