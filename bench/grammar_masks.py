"""Constrained decoding libraries compared: llguidance (tunelab's) and xgrammar, on SmolLM2's tokenizer.

For a slot-filling JSON schema: the time to prepare the tokenizer and compile the grammar, and the
time to compute one token mask per decoding step (median and worst over the steps of real
answers), replaying the tokens SmolLM2 wrote under llguidance. xgrammar is not a tunelab
dependency: `pip install --target /tmp/xg --no-deps xgrammar apache-tvm-ffi` and run with
`PYTHONPATH=/tmp/xg` to include it (a plain `pip install xgrammar` also pulls triton).

    python bench/grammar_masks.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = {"type": "object", "additionalProperties": False,
          "properties": {k: {"type": "string"} for k in ("people", "date", "time", "first_name", "last_name")}}
MESSAGES = ["book 7 people for dinner in 18 days at 7pm", "A table for two tomorrow, name is Ann Lee",
            "Can I reserve for 5 at 18:30 on Friday?", "I'd like to book please"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from tunelab.models.base import Request
    from tunelab.models.local import LocalModel

    model = LocalModel(threads=args.threads)
    reqs = [Request(messages=[{"role": "user", "content": f"Extract the booking slots as JSON.\n\nMessage: {m}"}],
                    max_tokens=48, json_schema=SCHEMA, constrained=True) for m in MESSAGES]
    answers = [model.tokenizer(c.text, add_special_tokens=False).input_ids for c in model.complete(reqs)]
    vocab = model.hf_model.get_output_embeddings().weight.shape[0]
    print(f"{len(answers)} answers, {sum(map(len, answers))} tokens; vocabulary {vocab}")

    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    start = time.perf_counter()
    info = llguidance.hf.from_tokenizer(model.tokenizer, n_vocab=vocab, eos_token=model.end_of_turn_ids()[0])
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
    llguidance.LLMatcher(info, grammar)
    setup = time.perf_counter() - start
    mask = lt.allocate_token_bitmask(1, vocab)
    times = []
    for _ in range(3):
        for ids in answers:
            m = llguidance.LLMatcher(info, grammar)
            for t in ids:
                t0 = time.perf_counter()
                lt.fill_next_token_bitmask(m, mask, 0)
                times.append(time.perf_counter() - t0)
                m.consume_token(t)
    print(f"llguidance {llguidance.get_version() if hasattr(llguidance, 'get_version') else ''}: setup {setup:.2f} s; "
          f"mask median {statistics.median(times) * 1e3:.4f} ms, max {max(times) * 1e3:.3f} ms")

    try:
        import xgrammar as xgr
    except ImportError:
        print("xgrammar: not installed (see the module doc)")
        return 0
    start = time.perf_counter()
    xinfo = xgr.TokenizerInfo.from_huggingface(model.tokenizer, vocab_size=vocab, stop_token_ids=model.end_of_turn_ids())
    compiled = xgr.GrammarCompiler(xinfo).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    setup = time.perf_counter() - start
    xmask = xgr.allocate_token_bitmask(1, vocab)
    times = []
    for _ in range(3):
        for ids in answers:
            m = xgr.GrammarMatcher(compiled)
            for t in ids:
                t0 = time.perf_counter()
                m.fill_next_token_bitmask(xmask, 0)
                times.append(time.perf_counter() - t0)
                if not m.accept_token(t):  # the two libraries may tokenize a value differently
                    break
    print(f"xgrammar: setup {setup:.2f} s; mask median {statistics.median(times) * 1e3:.4f} ms, "
          f"max {max(times) * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
