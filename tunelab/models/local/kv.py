"""A KV cache layer that grows in place: decoding and the label search of many labels append a
few tokens per step to a cache of hundreds, and transformers' `DynamicLayer` copies the whole
cache to append (`torch.cat`)."""

from __future__ import annotations

from typing import Any


def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A KV cache layer that writes into a preallocated buffer instead of concatenating (which
        copies the whole cache at every decoding step)."""

        @classmethod
        def of(cls, keys: list, values: list, n: int, extra: int) -> "GrowingLayer":
            import torch

            layer = cls()
            rows = sum(k.shape[0] for k in keys)
            shape = (rows, keys[0].shape[1], n + extra, keys[0].shape[3])
            layer._kbuf = torch.empty(shape, dtype=keys[0].dtype, device=keys[0].device)
            layer._vbuf = torch.empty(shape, dtype=values[0].dtype, device=values[0].device)
            row = 0
            for k, v in zip(keys, values):  # right-aligned, the padding on the left zeroed
                b, pad = k.shape[0], n - k.shape[2]
                for buf, t in ((layer._kbuf, k), (layer._vbuf, v)):
                    if pad:
                        buf[row:row + b, :, :pad].zero_()
                    buf[row:row + b, :, pad:n] = t
                row += b
            layer.dtype, layer.device = keys[0].dtype, keys[0].device
            layer.is_initialized = True
            layer._set(n)
            return layer

        def _set(self, n: int) -> None:
            self.n = n
            self.keys = self._kbuf[:, :, :n]
            self.values = self._vbuf[:, :, :n]

        def update(self, key_states, value_states, *args, **kwargs):
            import torch

            q = key_states.shape[2]
            if self.n + q > self._kbuf.shape[2]:  # out of room: grow (rare)
                grow = max(q, self._kbuf.shape[2] // 2)
                pad = list(self._kbuf.shape)
                pad[2] = grow
                self._kbuf = torch.cat([self._kbuf, self._kbuf.new_zeros(pad)], dim=2)
                self._vbuf = torch.cat([self._vbuf, self._vbuf.new_zeros(pad)], dim=2)
            self._kbuf[:, :, self.n:self.n + q] = key_states
            self._vbuf[:, :, self.n:self.n + q] = value_states
            self._set(self.n + q)
            return self.keys, self.values

        def crop(self, tokens_to_remove: int) -> None:
            self._set(self.n - abs(tokens_to_remove))

        def batch_select_indices(self, indices) -> None:
            self._kbuf = self._kbuf[indices]
            self._vbuf = self._vbuf[indices]
            self._set(self.n)

    return GrowingLayer


_growing_layer: Any = None


def growing_layer(keys: list, values: list, n: int, extra: int):
    """A cache layer holding `keys`/`values` stacked over the batch, each left-padded with zeros to
    `n` tokens, with room for `extra` more (the class is made on first use: transformers is imported
    lazily)."""
    global _growing_layer
    if _growing_layer is None:
        _growing_layer = _growing_layer_class()
    return _growing_layer.of(keys, values, n, extra)


_CACHE_KWARG: dict[type, str] = {}


def cache_kwarg(module: Any, cache: Any) -> dict[str, Any]:
    """The keyword that hands a KV cache to a transformers model's forward: `cache` from
    transformers 5.24 (where `past_key_values` is deprecated, to be removed in 5.40), else
    `past_key_values`; tunelab accepts every transformers 5.x."""
    import inspect

    kind = type(module)
    if kind not in _CACHE_KWARG:
        inner = module.get_base_model() if hasattr(module, "get_base_model") else module  # a peft wrapper
        params = inspect.signature(type(inner).forward).parameters
        _CACHE_KWARG[kind] = "cache" if "cache" in params else "past_key_values"
    return {_CACHE_KWARG[kind]: cache}


def returned_cache(output: Any) -> Any:
    """The KV cache a transformers forward returned (`cache` from 5.24, `past_key_values` before)."""
    found = getattr(output, "cache", None)
    return found if found is not None else getattr(output, "past_key_values", None)
