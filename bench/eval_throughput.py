"""Evaluation throughput: the textbook loop against `tunelab eval`, in one process, on one model.

The textbook loop answers one example at a time: render the chat messages, fp32 `model.generate`
(greedy) of up to 8 new tokens, then parse (`match_label` for a label; for JSON up to 48 tokens and
`json.loads`). `tunelab eval` is the library call `evaluate()` with its defaults (batched label
scoring, plus the free answer for the format-validity rate on a seeded sample of max(100, 20%) of
the examples; batched generation for JSON), the response cache off. Both use the same prompt on
the bundled SmolLM2-135M-Instruct.

Printed besides the rates: the accuracy of both sides (the textbook on its examples; tunelab on
all of its examples and on the textbook's), how often they agree, that every tunelab prediction is
the argmax of its label scores, the format-validity rate and over how many rows it was measured,
and (`--fp32-check`, after the timing) how often tunelab's predictions (bf16 where the CPU has
native bf16) agree with fp32 label scoring, with the fp32 accuracy.

    python bench/eval_throughput.py                     # sms_spam (500), restaurant8k_slots (100), dart_triples (100)
    python bench/eval_throughput.py --textbook-n 30 --label-n 200 --json-n 50 --text-n 50

On a shared machine, `--threads 1` keeps both loops out of each other's way and out of thread
contention with other processes; the CPU-time ratio (examples per CPU-second) is printed too, as
it is much less sensitive to the machine's load than the wall-clock ratio.

JSON is decoded under the schema's grammar (`constrained: true`, llguidance masks in the batched
decoding loop; `--json-unconstrained` turns it off); the textbook loop generates freely. Free text
(dart_triples, up to 64 tokens): batched generation against the same one-at-a-time loop, scored by
chrF against every reference.

Goals: >= 15x for label outputs, >= 8x for JSON extraction. The textbook loop runs on a prefix of
the examples (its examples/s is what is compared). Shared data: TUNELAB_SHARED_DATA, else
../shared/data next to the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LABEL_PROMPT = """---
output: {type: label, labels: [ham, spam]}
---
user:
Is this SMS message spam or ham? Answer with one word: spam or ham.

Message: {{ input }}
"""

SLOTS_SCHEMA = ('{type: object, additionalProperties: false, properties: {people: {type: string}, '
                'date: {type: string}, time: {type: string}, first_name: {type: string}, last_name: {type: string}}}')

JSON_PROMPT = f"""---
max_tokens: 48
output: {{type: json, schema: {SLOTS_SCHEMA}, constrained: {{constrained}}}}
demos:
  - {{input: "table for 4 people tomorrow at 7pm", output: '{{"people": "4 people", "date": "tomorrow", "time": "7pm"}}'}}
  - {{input: "hi there", output: '{{}}'}}
---
user:
Extract the booking slots (people, date, time, first_name, last_name) from the message as a JSON object.

Message: {{{{ input }}}}
"""

TEXT_PROMPT = """---
max_tokens: 64
output: text
---
user:
Write one English sentence that states every fact in these triples (subject | predicate | object).

Triples: {{ input }}
"""


def shared_data() -> Path:
    path = Path(os.environ.get("TUNELAB_SHARED_DATA") or REPO.parent / "shared" / "data")
    if not path.is_dir():
        sys.exit(f"shared data sets not found at {path} (set TUNELAB_SHARED_DATA)")
    return path


def load_examples(folder: Path, split: str, n: int):
    from tunelab.datasets import Example

    with (folder / f"{split}.jsonl").open(encoding="utf-8") as f:
        return [Example.from_dict(json.loads(line)) for line, _ in zip(f, range(n))]


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def textbook_loop(hf_model, tokenizer, prompt, examples, max_new_tokens: int, parse) -> tuple[float, list]:
    """One example at a time: render, generate greedily in fp32, parse. Returns (examples/s, answers)."""
    import torch

    answers = []
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for ex in examples:
            text = tokenizer.apply_chat_template(prompt.render(ex), add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            out = hf_model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            answers.append(parse(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)))
    return len(examples) / (time.perf_counter() - start), len(examples) / (time.process_time() - cpu), answers


def check_fp32(cand, examples, rows) -> None:
    """Score `examples` with fp32 label scoring and compare with the run's predictions."""
    from tunelab.models.local import LocalModel

    if getattr(cand.model, "precision", "fp32") == "fp32":
        print("  fp32 check: tunelab ran in fp32 already")
        return
    fp32 = LocalModel(precision="fp32", threads=None)
    reqs = [cand.prompt.request(ex, cand.demos) for ex in examples]
    comps = []
    for k in range(0, len(reqs), 64):
        comps += fp32.complete(reqs[k:k + 64])
    agree = sum(c.text == rows[i].prediction for i, c in enumerate(comps))
    acc32 = sum(c.text == ex.output for c, ex in zip(comps, examples)) / len(examples)
    acc = sum(rows[i].prediction == ex.output for i, ex in enumerate(examples)) / len(examples)
    print(f"  fp32 check on {len(examples)} examples: {cand.model.precision} and fp32 label scoring agree on {agree} "
          f"({agree / len(examples):.1%}); accuracy {cand.model.precision} {acc:.3f}, fp32 {acc32:.3f}")
    fp32.close()


def parse_json_answer(text: str):
    try:
        return json.loads(text.strip())
    except json.JSONDecodeError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label-n", type=int, default=500, help="sms_spam test examples for tunelab eval")
    ap.add_argument("--textbook-n", type=int, default=60, help="sms_spam examples for the textbook loop")
    ap.add_argument("--json-n", type=int, default=100, help="restaurant8k_slots examples for tunelab eval")
    ap.add_argument("--json-textbook-n", type=int, default=20, help="slots examples for the textbook loop")
    ap.add_argument("--text-n", type=int, default=100, help="dart_triples examples for tunelab eval (0: skip)")
    ap.add_argument("--text-textbook-n", type=int, default=12, help="dart_triples examples for the textbook loop")
    ap.add_argument("--skip-json", action="store_true", help="skip the JSON benchmark")
    ap.add_argument("--skip-label", action="store_true", help="skip the label benchmark")
    ap.add_argument("--json-unconstrained", action="store_true", help="JSON without constrained decoding")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both loops (default: torch's; 1 is fairest on a loaded machine)")
    ap.add_argument("--no-free-text", action="store_true",
                    help="tunelab without the free answer of label outputs (label scoring only)")
    ap.add_argument("--free-answers", default=None,
                    help="label outputs: free answers on all, N or P%% of the examples (default: evaluate's, "
                         "max(100, 20%%))")
    ap.add_argument("--fp32-check", type=int, default=0, metavar="N",
                    help="after the timing: score the first N label examples in fp32 too and print the "
                         "agreement of tunelab's predictions with fp32 (0: skip)")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.datasets import save_dataset
    from tunelab.evaluate import evaluate, resolve_candidate, run_rows
    from tunelab.models.base import match_label
    from tunelab.models.weights import bundled_model_dir
    from tunelab.prompts import load_prompt
    from tunelab.workspace import Workspace

    if args.threads:
        torch.set_num_threads(args.threads)
    data = shared_data()
    tmp = tempfile.TemporaryDirectory(prefix="tunelab-bench-")
    ws = Workspace.init(Path(tmp.name) / "ws")
    (ws.prompts_dir / "spam.prompt").write_text(LABEL_PROMPT, encoding="utf-8")
    constrained = "false" if args.json_unconstrained else "true"
    (ws.prompts_dir / "slots.prompt").write_text(JSON_PROMPT.replace("{constrained}", constrained), encoding="utf-8")
    (ws.prompts_dir / "say.prompt").write_text(TEXT_PROMPT, encoding="utf-8")

    model_dir = bundled_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf_fp32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average {load_average()}")
    results = {}

    def bench(kind: str, dataset: str, prompt_name: str, n_tool: int, n_text: int, max_new: int, parse, correct):
        folder = data / dataset
        examples = load_examples(folder, "test", max(n_tool, n_text))
        save_dataset(ws, prompt_name, {"test": examples[:n_tool]})
        prompt = load_prompt(ws, prompt_name)
        cand = resolve_candidate(ws, prompt_name, free_text=not args.no_free_text)
        cand.model.complete(cand.requests(examples[:2]))  # load the weights before timing
        print(f"\n[{kind}] {dataset}: textbook loop on {n_text} examples (fp32 generate, <= {max_new} tokens) ...")
        la0 = load_average()
        text_rate, text_cpu_rate, answers = textbook_loop(hf_fp32, tokenizer, prompt, examples[:n_text], max_new, parse)
        text_acc = sum(correct(a, ex) for a, ex in zip(answers, examples)) / n_text
        print(f"  textbook: {text_rate:.2f} examples/s, {text_cpu_rate:.2f} per CPU-second (primary metric on its {n_text}: {text_acc:.3f}); "
              f"load average {la0} -> {load_average()}")
        print(f"[{kind}] tunelab eval on {n_tool} examples ({cand.model.precision}) ...")
        la0 = load_average()
        start, cpu = time.perf_counter(), time.process_time()
        result = evaluate(ws, cand, f"{prompt_name}:test", use_cache=False, rerun=True, progress=False,
                          free_answers=args.free_answers)
        wall = time.perf_counter() - start
        cpu_rate = n_tool / (time.process_time() - cpu)
        rate = n_tool / wall
        primary = result.primary_metric
        print(f"  tunelab:  {rate:.2f} examples/s, {cpu_rate:.2f} per CPU-second ({wall:.1f} s wall; {primary} "
              f"{result.metrics[primary]['value']:.3f}); load average {la0} -> {load_average()}")
        extra = {k: round(v["value"], 3) for k, v in result.metrics.items() if v.get("value") is not None}
        print(f"  metrics: {extra}")
        rows = {r.example_index: r for r in run_rows(ws, result.id)}
        if kind == "label":
            fv = result.consistency.get("format_valid") or {}
            if fv.get("value") is not None:
                print(f"  format valid (free answers): {fv['value']:.3f} [{fv['lo']:.3f}, {fv['hi']:.3f}] measured on "
                      f"{fv.get('rows', fv['n'])} of {fv.get('of', result.rows)} rows")
            argmax = sum(r.prediction == max(r.extra["label_logprobs"], key=r.extra["label_logprobs"].get)
                         for r in rows.values())
            print(f"  predictions that are the argmax of the label scores: {argmax} of {len(rows)}")
        both = [(a, ex, rows[i]) for i, (a, ex) in enumerate(zip(answers, examples)) if i in rows]
        tool_acc = sum(correct(parse(r.prediction) if kind == "json" else r.prediction, ex) for _, ex, r in both)
        if kind == "json":
            print(f"  schema-valid: tunelab {result.metrics.get('json_schema', {}).get('value')}, textbook "
                  f"{sum(a is not None for a in answers) / n_text:.3f} (parses)")
        same = sum(a == (parse(r.prediction) if kind == "json" else r.prediction) for a, _, r in both)
        print(f"  on the textbook's {len(both)} examples: textbook {text_acc:.3f}, tunelab {tool_acc / len(both):.3f} "
              f"(primary metric); same answer on {same} of {len(both)}")
        if kind == "label" and args.fp32_check:
            check_fp32(cand, examples[:min(args.fp32_check, n_tool)], rows)
        print(f"  ratio: {rate / text_rate:.1f}x (wall clock), {cpu_rate / text_cpu_rate:.1f}x (CPU time)")
        results[kind] = {"textbook_examples_per_s": text_rate, "tunelab_examples_per_s": rate,
                         "ratio": rate / text_rate, "cpu_ratio": cpu_rate / text_cpu_rate,
                         "n_tunelab": n_tool, "n_textbook": n_text}

    if not args.skip_label and args.label_n:
        bench("label", "sms_spam", "spam", args.label_n, args.textbook_n, 8,
              lambda text: match_label(text, ["ham", "spam"]), lambda a, ex: a == ex.output)
    if not args.skip_json and args.json_n:
        def json_correct(a, ex):
            return a is not None and a == json.loads(ex.output)

        bench("json", "restaurant8k_slots", "slots", args.json_n, args.json_textbook_n, 48, parse_json_answer,
              json_correct)
    if args.text_n:
        from tunelab.metrics import Answer, make_metric

        chrf = make_metric("chrf")

        def text_correct(a, ex):
            return chrf.score(Answer(ex.output, a or "", example=ex))

        bench("text", "dart_triples", "say", args.text_n, args.text_textbook_n, 64, lambda t: t.strip(), text_correct)
    print("\nsummary:")
    goals = {"label": 15, "json": 8}
    for kind, r in results.items():
        print(f"  {kind}: textbook {r['textbook_examples_per_s']:.2f} ex/s, tunelab {r['tunelab_examples_per_s']:.2f} "
              f"ex/s, ratio {r['ratio']:.1f}x (" + (f"goal >= {goals[kind]}x; " if kind in goals else "")
              + f"CPU-time ratio {r['cpu_ratio']:.1f}x)")
    print(json.dumps({"eval_throughput": results, "load_average": load_average()}))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
