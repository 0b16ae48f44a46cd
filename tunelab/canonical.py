"""Content addressing: canonical JSON, its sha256, and plain JSON-safe values.

    sha256({"b": 1, "a": [1.0, "x"]})      # the same digest on any machine, in any key order
    plain({"v": float("nan"), "n": np.int64(3)})   # {"v": None, "n": 3}

Prompt versions, dataset versions, run keys, cache keys and fingerprints are all the sha256 of
canonical JSON made here, so the same content gets the same id everywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any


def canonical_json(data: Any) -> str:
    """JSON with sorted keys, no spaces and UTF-8 kept: one text per value."""
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def sha256(data: Any) -> str:
    """The hex sha256 of `data`'s canonical JSON (a str is hashed as its JSON string)."""
    return hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()


def plain(data: Any) -> Any:
    """`data` made JSON-safe: NaN and infinities become None, numpy scalars Python numbers,
    tuples lists."""
    if isinstance(data, dict):
        return {k: plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [plain(v) for v in data]
    if isinstance(data, bool) or data is None or isinstance(data, str):
        return data
    if isinstance(data, float) or type(data).__module__ == "numpy":
        try:
            value = data.item() if hasattr(data, "item") else data
        except (TypeError, ValueError):
            return data
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return None
        return value
    return data
