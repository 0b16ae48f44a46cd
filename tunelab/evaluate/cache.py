"""The response cache: completions stored by the sha256 of their request.

`CachedModel(model, ResponseCache(ws))` answers a request from the store's `cache` table when the
sha256 of canonical JSON {model fingerprint, messages, request parameters (seed = the repeat index
included)} is there, and stores what it computes. Re-running an unchanged candidate costs nothing;
repeats have different seeds, so the cache never hands the first answer back K times. A cached
completion keeps its measured latency and tokens, so its row (and cost) is as measured. A label
request without a free answer can take the entry of the same request with one (same scores; the
free answer is dropped): a run on a free-answer sample reuses a run on all.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from sqlalchemy import select

from tunelab.canonical import sha256
from tunelab.models.base import Completion, Model, Request, WrappedModel
from tunelab.store import insert_ignore
from tunelab.store.models import CacheRow, utcnow

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

class ResponseCache:
    """Completions in the store's `cache` table, keyed by the sha256 of the request."""

    def __init__(self, ws: "Workspace"):
        self.ws = ws
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model: Model, request: Request) -> str:
        return sha256({"model": model.fingerprint, "messages": request.messages, "params": request.cache_params()})

    def get_many(self, keys: list[str]) -> dict[str, Completion]:
        found: dict[str, Completion] = {}
        unique = list(dict.fromkeys(keys))
        with self.ws.store.session() as s:
            for start in range(0, len(unique), 500):
                for row in s.scalars(select(CacheRow).where(CacheRow.key.in_(unique[start:start + 500]))):
                    try:
                        found[row.key] = Completion.from_dict(row.value)
                    except TypeError:
                        continue  # an entry from an older Completion layout: recompute it
        return found

    def put_many(self, items: dict[str, Completion]) -> None:
        if not items:
            return
        values = [{"key": k, "value": c.to_dict(), "created_at": utcnow()} for k, c in items.items()]
        with self.ws.store.session() as s:
            s.execute(insert_ignore(s, CacheRow), values)


FREE_ANSWER_META = ("free_text_tokens", "free_text_from_scoring", "decode_batch_size")


class CachedModel(WrappedModel):
    """A model answering through a ResponseCache; misses go to the wrapped model in one batch."""

    def __init__(self, model: Model, cache: ResponseCache):
        super().__init__(model)
        self.cache = cache

    def complete(self, requests: list[Request]) -> list[Completion]:
        keys = [ResponseCache.key(self.inner, r) for r in requests]
        # A label request without a free answer can take the entry of the same request with one
        # (same scores; the free answer is dropped): a run on a free-answer sample reuses a run on all.
        fuller = {i: ResponseCache.key(self.inner, replace(r, free_text=True))
                  for i, r in enumerate(requests) if r.labels and not r.free_text}
        found = self.cache.get_many(keys + list(fuller.values()))
        out: list[Completion | None] = [None] * len(requests)
        for i, k in enumerate(keys):
            hit = found.get(k) or found.get(fuller.get(i, ""))
            if hit is None:
                continue
            comp = Completion.from_dict(hit.to_dict())
            if k not in found:
                comp.free_text = None
                comp.meta = {m: v for m, v in comp.meta.items() if m not in FREE_ANSWER_META}
            comp.meta = {**comp.meta, "cached": True}
            out[i] = comp
        missing = [i for i, c in enumerate(out) if c is None]
        self.cache.hits += len(requests) - len(missing)
        self.cache.misses += len(missing)
        if missing:
            fresh = self.inner.complete([requests[i] for i in missing])
            new: dict[str, Completion] = {}
            for i, comp in zip(missing, fresh):
                out[i] = comp
                new[keys[i]] = comp
            self.cache.put_many(new)
        return [c for c in out if c is not None]

    def close(self) -> None:
        self.inner.close()
