"""Speed of the local backend on this machine, against the textbook loop in the same process.

    .venv/bin/python bench/local_model_speed.py [--n 100] [--precision bf16 fp32] [--threads N]

Prints examples/s of label scoring (sms_spam: 2 labels, tweeteval_emotion: 4, legal_unfair_tos: 9),
JSON extraction (restaurant8k_slots) and generation tokens/s at batch 1/16/64, and the textbook
loop: one example at a time, an fp32 `generate` of up to 8 tokens (64 for JSON), then parse.
The shared machine is noisy: run it twice and trust figures that agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tunelab.models.base import Request, match_label  # noqa: E402
from tunelab.models.local import LocalModel  # noqa: E402

DATA = Path(os.environ.get("TUNELAB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

TASKS = {
    "spam": ("sms_spam", "Is this SMS message spam or ham?\n\nMessage: {x}\n\nAnswer with one word: {labels}."),
    "emotion": ("tweeteval_emotion", "Which emotion does this tweet express?\n\nTweet: {x}\n\n"
                "Answer with one word: {labels}."),
    "legal": ("legal_unfair_tos", "Which kind of Terms-of-Service clause is this?\n\nClause: {x}\n\n"
              "Answer with one of: {labels}."),
}
JSON_PROMPT = ("Extract the booking slots (people, date, time, first_name, last_name) from the message as a "
               "JSON object; omit absent slots.\n\nMessage: {x}")


def load(name: str, n: int) -> list[dict]:
    lines = (DATA / name / "test.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def labels_of(name: str) -> list[str]:
    return (DATA / name / "labels.txt").read_text().split("\n")[:-1] or []


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def textbook(model: LocalModel, prompts: list[list[dict]], max_new: int, labels: list[str] | None) -> float:
    """One example at a time: fp32 generate, decode, parse. Returns examples/s."""
    import torch

    tok, hf = model.tokenizer, model.hf_model
    start = time.perf_counter()
    with torch.inference_mode():
        for msgs in prompts:
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            out = hf.generate(**ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            if labels:
                match_label(text, labels)
            else:
                try:
                    json.loads(text)
                except ValueError:
                    pass
    return len(prompts) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100, help="examples per task")
    ap.add_argument("--textbook-n", type=int, default=20, help="examples for the (slow) textbook loop")
    ap.add_argument("--precision", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--tasks", nargs="+", default=["spam", "emotion", "legal", "json", "gen"])
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, n={args.n}, load average {os.getloadavg()[0]:.1f}")

    base = LocalModel(precision="fp32")
    tb: dict[str, float] = {}
    for task in args.tasks:
        if task in TASKS:
            name, template = TASKS[task]
            labels = labels_of(name)
            msgs = [chat(template.format(x=e["input"], labels=", ".join(labels))) for e in load(name, args.textbook_n)]
            tb[task] = textbook(base, msgs, 8, labels)
        elif task == "json":
            msgs = [chat(JSON_PROMPT.format(x=e["input"])) for e in load("restaurant8k_slots", args.textbook_n)]
            tb[task] = textbook(base, msgs, 64, None)
        if task in tb:
            print(f"textbook fp32 {task:8s} {tb[task]:7.2f} ex/s")

    for precision in args.precision:
        model = base if precision == "fp32" else LocalModel(precision=precision)
        _ = model.hf_model
        for task in args.tasks:
            if task in TASKS:
                name, template = TASKS[task]
                labels = labels_of(name)
                examples = load(name, args.n)
                reqs = [Request(messages=chat(template.format(x=e["input"], labels=", ".join(labels))), labels=labels)
                        for e in examples]
                model.complete(reqs[:2])  # warm up
                out, secs = timed(lambda: model.complete(reqs))
                acc = sum(c.text == e["output"] for c, e in zip(out, examples)) / len(examples)
                rate = len(reqs) / secs
                print(f"{precision} label scoring {task:8s} {rate:7.2f} ex/s  ({rate / tb[task]:5.1f}x textbook)"
                      f"  accuracy {acc:.2f}" if task in tb else f"{precision} label scoring {task} {rate:.2f} ex/s")
            elif task == "json":
                examples = load("restaurant8k_slots", args.n)
                reqs = [Request(messages=chat(JSON_PROMPT.format(x=e["input"])), max_tokens=64,
                                json_schema={"type": "object"}) for e in examples]
                out, secs = timed(lambda: model.complete(reqs))
                rate = len(reqs) / secs
                toks = sum(c.completion_tokens for c in out)
                ratio = f"({rate / tb['json']:5.1f}x textbook)" if "json" in tb else ""
                print(f"{precision} json extraction   {rate:7.2f} ex/s  {ratio}  {toks / secs:6.1f} tok/s")
            elif task == "gen":
                text = [e["input"] for e in load("sms_spam", 64)]
                for bs in (1, 16, 64):
                    reqs = [Request(messages=chat(f"Reply to this message: {t}"), max_tokens=32)
                            for t in text[:max(bs, 4)]]
                    model.max_batch = bs
                    out, secs = timed(lambda: model.complete(reqs))
                    model.max_batch = 64
                    toks = sum(c.completion_tokens for c in out)
                    print(f"{precision} generation batch {bs:3d} {toks / secs:7.1f} tok/s")


if __name__ == "__main__":
    main()
