"""A comparison's numbers as the Markdown table of docs/results.md.

    python bench/results_table.py WORKSPACE/.tunelab/artifacts/comparisons/ID/report.json

One row per candidate: kind, the primary metric with its 95% interval, the other metrics of its
output type, format validity, tokens per request, latency p50/p95, cost per 1,000 requests and
setup time — read from the comparison's JSON twin (`Comparison.model_dump`).
"""

from __future__ import annotations

import json
import sys

EXTRA = {"json": ["json_match", "json_schema"], "text": ["bleu", "rouge_l", "semantic", "length_ratio"],
         "label": ["macro_f1"]}


def fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def main(path: str) -> int:
    c = json.load(open(path, encoding="utf-8"))
    kind = c.get("output_type", "label")
    extra = EXTRA[kind]
    print(f"| candidate | kind | {c['metric']} [95% CI] | " + " | ".join(extra)
          + " | format valid | tokens/req | p50 / p95 ms | $ per 1k | setup |")
    print("|" + "---|" * (8 + len(extra)))
    for e in c["candidates"]:
        m = e["metric"]
        cells = [f"`{e['name']}`", e["kind"], f"{fmt(m['value'])} [{fmt(m['low'])}, {fmt(m['high'])}]"]
        cells += [fmt((e["metrics"].get(n) or {}).get("value")) for n in extra]
        lat = e["latency"]
        cells += [fmt(e["consistency"].get("format_validity"), 2), f"{e['tokens']['total']:.0f}",
                  f"{lat['p50'] * 1000:.0f} / {lat['p95'] * 1000:.0f}" if lat.get("p50") is not None else "–",
                  f"{e['cost_per_1k']:.4f}",
                  f"{e['setup']['wall_s'] / 60:.1f} min" if e["setup"]["wall_s"] else "–"]
        print("| " + " | ".join(cells) + " |")
    rec = c.get("recommendation") or {}
    print(f"\nAdvice: {rec.get('headline', '–')}")
    for p in c.get("pairwise", []):
        if p["significant"]:
            print(f"- {p['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
