"""Constrained decoding for the local backend: an answer decoded under the grammar of a JSON schema.

`Grammars.matcher(schema)` gives one llguidance matcher per answer; `Grammars.mask` sets every
token the row's grammar forbids to -inf in the decoding step's logits (the batched decoding loop of
`tunelab.models.local.engine` calls it for the rows of constrained requests).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from tunelab.errors import UserError

if TYPE_CHECKING:
    from tunelab.models.local.model import LocalModel

CLOSE_MARGIN = 8  # in its last tokens of max_tokens an answer prefers tokens that close the JSON value


class Grammars:
    """Constrained decoding for one model: JSON-schema grammars compiled by llguidance (a Rust
    library, the one vLLM and SGLang use too), applied as a token bitmask on the logits of every
    decoding step. Why llguidance (docs/results.md has the measurements): the same speed as
    xgrammar (about 0.01 ms per token mask for a slot-filling schema on one CPU core, SmolLM2's
    49k vocabulary), a small wheel with no dependencies, where xgrammar pulls triton and a TVM
    runtime into the install."""

    def __init__(self, model: "LocalModel"):
        self.lm = model
        self._tokenizer: Any = None
        self._grammars: dict[str, str] = {}
        self._mask: Any = None
        self._closers: Any = None

    def tokenizer(self):
        if self._tokenizer is None:
            import llguidance.hf

            vocab = self.lm.hf_model.get_output_embeddings().weight.shape[0]
            self._tokenizer = llguidance.hf.from_tokenizer(self.lm.tokenizer, n_vocab=vocab,
                                                           eos_token=self.lm.end_of_turn_ids()[0])
        return self._tokenizer

    def matcher(self, schema: dict | None):
        """A fresh matcher for one answer under `schema` (None: any JSON value)."""
        import llguidance

        key = json.dumps(schema if schema is not None else {}, sort_keys=True)
        if key not in self._grammars:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(key, defaults={"whitespace_flexible": False})
            error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer())
            if error and not error.startswith("WARNING"):
                raise UserError(f"cannot decode under this JSON schema: {error}", field="output.schema")
            self._grammars[key] = grammar
        return llguidance.LLMatcher(self.tokenizer(), self._grammars[key], log_level=0)

    def closers(self, vocab: int):
        """Two rankings of the tokens that close JSON: inside a string, those that start with `"`
        (2 when they also close an object or array: `"}`); outside one, those made of `}`/`]`."""
        if self._closers is None:
            import torch

            quote, brace = torch.zeros(vocab), torch.zeros(vocab)
            for token_id in range(min(vocab, len(self.lm.tokenizer))):
                text = self.lm.tokenizer.decode([token_id]).strip()
                if not text or not set(text) <= set('"}]'):
                    continue
                if text[0] == '"':
                    quote[token_id] = 2.0 if text[-1] in "}]" else 1.0
                else:
                    brace[token_id] = 1.0
            self._closers = (quote, brace)
        return self._closers

    def mask(self, matchers: list, logits, remaining: list[int] | None = None, texts: list[str] | None = None):
        """`logits` (rows x vocabulary) with the tokens each row's grammar forbids set to -inf
        (rows without a grammar, or whose matcher failed, unchanged). A row with at most
        CLOSE_MARGIN tokens of its budget left prefers, among the allowed tokens, those that close
        its JSON value (`texts`: each row's answer so far), so that an answer cut by max_tokens
        still parses."""
        import llguidance.torch as lt

        rows, vocab = logits.shape
        if self._mask is None or self._mask.shape[0] < rows:
            self._mask = lt.allocate_token_bitmask(max(rows, 8), vocab)
        mask = self._mask[:rows]
        mask.fill_(-1)
        for row, m in enumerate(matchers):
            if m is not None and not m.is_error():
                lt.fill_next_token_bitmask(m, mask, row)
        cpu = logits if logits.device.type == "cpu" else logits.cpu()
        if remaining is not None and texts is not None:
            quote, brace = self.closers(vocab)
            for row, m in enumerate(matchers):
                if m is not None and remaining[row] <= CLOSE_MARGIN:
                    cpu[row] += (quote if in_string(texts[row]) else brace)[:vocab] * 1e4
        lt.apply_token_bitmask_inplace(cpu, mask)
        return cpu if cpu is logits else cpu.to(logits.device)


def in_string(text: str) -> bool:
    """Whether `text` (JSON so far) ends inside a string."""
    inside = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and inside:
            escaped = True
        elif ch == '"':
            inside = not inside
    return inside
