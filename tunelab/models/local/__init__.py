"""The local backend (transformers on CPU or one GPU): `LocalModel` (`model`), its batching engine
(`engine`: prompt passes, label tries, decoding), the search over many labels' trie (`labels`), the
layout helpers it plans with (`layout`, no torch), the KV cache layer that grows in place (`kv`)
and the fused Llama forward pass (`fused`)."""

from tunelab.models.local.layout import (LabelTrie, build_trie, common_prefix_len, find_stop, greedy_label, json_end,
                                         make_batches, trim_output)
from tunelab.models.local.model import PRECISIONS, LocalModel, cpu_supports_bf16

__all__ = ["PRECISIONS", "LabelTrie", "LocalModel", "build_trie", "common_prefix_len", "cpu_supports_bf16",
           "find_stop", "greedy_label", "json_end", "make_batches", "trim_output"]
