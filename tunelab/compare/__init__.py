"""The answer: every candidate side by side on one split, what to do, and the report.

    comp = compare(ws, "support:test", ["support@v2", "ft:support", "hybrid:support"], volume=100_000)
    advice = advise(comp, Constraints(budget=50, change_frequency="weekly"))
    print_table(comp); write_report(comp, "report.html")

Modules: `costs` (the cost model: horizon cost, break-even, payback), `result` (the typed
`Comparison`, `CandidateEntry`, `Advice`: the JSON twin is their model_dump), `compare` (measuring
and storing comparisons), `advise` (the advisor's rules), `report` (HTML, plots, the terminal
table), `format` (numbers as text, one way everywhere).
"""

from tunelab.compare.advise import Constraints, advise
from tunelab.compare.compare import (break_even_pairs, compare, list_comparisons, load_comparison, report_path,
                                     save_comparison, setup_of)
from tunelab.compare.curves import run_learning_curve
from tunelab.compare.costs import (ALPHA, DEFAULT_VOLUME, HORIZON_MONTHS, break_even_volume, cost_curve, horizon_cost,
                                   payback_months, volume_grid)
from tunelab.compare.report import print_table, render_html, table_rows, write_report
from tunelab.compare.result import SCHEMA, Advice, CandidateEntry, Comparison

__all__ = ["ALPHA", "Advice", "CandidateEntry", "Comparison", "Constraints", "DEFAULT_VOLUME", "HORIZON_MONTHS",
           "SCHEMA", "advise", "break_even_pairs", "break_even_volume", "compare", "cost_curve", "horizon_cost",
           "list_comparisons", "load_comparison", "payback_months", "print_table", "render_html", "report_path",
           "run_learning_curve", "save_comparison", "setup_of", "table_rows", "volume_grid", "write_report"]
