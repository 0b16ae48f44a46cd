"""The comparison report: one self-contained HTML file, its JSON twin, and a terminal table.

    html = render_html(comparison)               # a str; plots are embedded base64 PNGs
    write_report(comparison, "report.html")      # writes report.html and report.json beside it
    print_table(comparison, console)             # the same numbers as a rich table

The input is a `Comparison` (`tunelab.compare.result`); the JSON twin is its `model_dump`. Nothing
in the page is loaded from the network: no scripts, fonts or stylesheets from elsewhere.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from tunelab import finetune
from tunelab.compare.costs import cost_curve, volume_grid
from tunelab.compare.format import fmt_interval, fmt_money, fmt_months, fmt_p, fmt_seconds
from tunelab.compare.result import CandidateEntry, Comparison, CurveSeries
from tunelab.files import write_atomic, write_json

COLORS = {"prompt": "#2b6cb0", "ft": "#c05621", "hybrid": "#2f855a"}
EXTRA_COLORS = ["#6b46c1", "#b83280", "#319795", "#975a16", "#4a5568"]


def table_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """The side-by-side table (one row per aspect, one column per candidate), as text."""
    cands = comparison.candidates
    months, volume = comparison.months, comparison.volume_per_month

    def row(label: str, fn) -> list[str]:
        out = [label]
        for c in cands:
            try:
                out.append(fn(c))
            except (TypeError, ValueError):  # a number the run could not measure
                out.append("–")
        return out

    def vs_best(c: CandidateEntry) -> str:
        t = c.vs_best
        if t is None:
            return "best"
        d = f"{t.difference:+.3f} " if t.difference is not None else ""
        return f"{d}{fmt_p(t.p_value)} ({t.test})" + (" *" if t.significant else "")

    def consistency(c: CandidateEntry) -> str:
        k = c.consistency
        parts = []
        if k.agreement is not None:
            parts.append(f"agree {k.agreement:.2f}")
        if k.pass_k is not None:
            parts.append(f"pass^{k.repeat} {k.pass_k:.2f}")
        if k.format_validity is not None:
            parts.append(f"valid {k.format_validity:.2f}")
        return ", ".join(parts) or "–"

    def routing(c: CandidateEntry) -> str:
        r = c.routing
        return "–" if r is None else f"primary {r.primary:.0%} / fallback {r.fallback:.0%}"

    rows = [
        row("kind", lambda c: "classical baseline (reference)" if c.kind == "baseline" else c.kind),
        row(f"{comparison.metric} [95% interval]", lambda c: fmt_interval(c.metric)),
        row("vs best (paired test)", vs_best),
        row("consistency", consistency),
        row("tokens / request (prompt+completion)",
            lambda c: f"{c.tokens.total:.0f} ({c.tokens.prompt:.0f}+{c.tokens.completion:.0f})"),
        row("latency p50 / p95", lambda c: f"{fmt_seconds(c.latency.p50)} / {fmt_seconds(c.latency.p95)}"),
        row("throughput", lambda c: f"{c.latency.throughput_per_s:.1f} req/s"),
        row("setup time", lambda c: fmt_seconds(c.setup.wall_s)),
        row("setup cost", lambda c: fmt_money(c.setup.total_cost)),
        row("cost / 1,000 requests", lambda c: fmt_money(c.cost_per_1k)),
        row(f"cost over {months} months at {volume:,.0f}/month", lambda c: fmt_money(c.cost_horizon)),
        row("time to change behaviour", lambda c: f"{fmt_seconds(c.flexibility.change_s)} ({c.flexibility.how})"),
        row("training examples", lambda c: "–" if c.examples_trained is None else f"{c.examples_trained:,}"),
        row("traffic share", routing),
    ]
    if not any(c.routing for c in cands):
        rows.pop()
    return ["aspect"] + [c.name for c in cands], rows


def print_table(comparison: Comparison, console=None, *, advice: bool = True) -> None:
    """The comparison as a rich table on the terminal, then the break-evens and (with `advice`)
    the recommendation."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    header, rows = table_rows(comparison)
    ds = comparison.dataset
    table = Table(title=f"{ds.name}:{ds.split} ({ds.n_examples} examples)", show_lines=False)
    for i, h in enumerate(header):
        table.add_column(h, style="bold" if i == 0 else None, overflow="fold")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    for be in comparison.break_even:
        pay = be.payback_months
        console.print(f"break-even: {be.a} vs {be.b} at {be.volume_per_month:,.0f} requests/month"
                      + (f"; payback {fmt_months(pay)} at the expected volume" if pay is not None else ""))
    curve = comparison.learning_curve
    if curve is not None and curve.crossover is not None:
        console.print(f"learning curves: {curve.crossover.text}", markup=False, highlight=False)
    for text in (curve.left_out if curve is not None else []):
        console.print(f"learning curve left out by the time budget: {text}", markup=False, highlight=False)
    rec = comparison.recommendation
    if advice and rec is not None:
        console.print(f"[bold]recommendation: {rec.headline}[/bold]")
        for reason in rec.reasons:
            console.print(f"  - {reason}", markup=False)


# -- plots -----------------------------------------------------------------------------------------
def _colors(cands: list[CandidateEntry]) -> list[str]:
    used: set[str] = set()
    out = []
    for c in cands:
        col = COLORS.get(c.kind)
        if col is None or col in used:
            col = next(x for x in EXTRA_COLORS + [f"C{j}" for j in range(10)] if x not in used)
        used.add(col)
        out.append(col)
    return out


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _bounds(m, value: float) -> tuple[float, float]:
    return (m.low if m.low is not None else value), (m.high if m.high is not None else value)


def plot_metric(comparison: Comparison) -> str | None:
    cands = comparison.candidates
    if not cands:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(cands) + 1.2))
    values = [c.metric.value or 0.0 for c in cands]  # None: no value (e.g. nothing scored)
    lows, highs = zip(*(_bounds(c.metric, v) for c, v in zip(cands, values)))
    ys = list(range(len(cands)))[::-1]
    ax.barh(ys, values, color=_colors(cands), alpha=0.35)
    ax.errorbar(values, ys, xerr=[[max(0.0, v - lo) for v, lo in zip(values, lows)],
                                   [max(0.0, hi - v) for v, hi in zip(values, highs)]],  # float noise at 0 or 1
                fmt="o", color="black", capsize=4)
    for y, v in zip(ys, values):
        ax.text(v, y + 0.25, f"{v:.3f}", ha="center", fontsize=8)
    ax.set_yticks(ys, [c.name for c in cands])
    ax.set_xlim(0, max(1.0, max(highs) * 1.05))
    ax.set_xlabel(f"{comparison.metric} (95% interval)")
    ax.set_title("Quality on the same split")
    return _png(fig)


def plot_cost(comparison: Comparison) -> str | None:
    cands = comparison.candidates
    if not cands:
        return None
    plt = _plt()
    months, volume, bes = comparison.months, comparison.volume_per_month, comparison.break_even
    grid = volume_grid(volume, [b.volume_per_month for b in bes])
    fig, ax = plt.subplots(figsize=(7, 4))
    for c, col in zip(cands, _colors(cands)):
        ax.plot(grid, cost_curve(c.setup.total_cost, c.cost_per_request, grid, months), label=c.name, color=col)
    for b in bes:
        v = b.volume_per_month
        if v <= grid[-1]:
            a = comparison.entry(b.a)
            y = a.setup.total_cost + months * v * a.cost_per_request
            ax.plot([v], [y], marker="X", markersize=10, color="black", linestyle="none")
            ax.annotate(f"break-even\n{v:,.0f}/month", (v, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if volume:
        ax.axvline(volume, color="gray", linestyle="--", linewidth=1)
        ax.annotate(f"expected {volume:,.0f}/month", (volume, 0), textcoords="offset points", xytext=(4, 4),
                    fontsize=8, color="gray")
    ax.set_xlabel("requests per month")
    ax.set_ylabel(f"cost over {months} months ($)")
    ax.set_title("Cost against monthly volume (setup + requests)")
    ax.legend(fontsize=8)
    ax.ticklabel_format(axis="x", style="plain")
    return _png(fig)


def plot_latency(comparison: Comparison) -> str | None:
    cands = [c for c in comparison.candidates if c.latency.samples]
    if not cands:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(cands) + 1.5))
    parts = ax.boxplot([[s * 1000 for s in c.latency.samples] for c in cands], vert=False, patch_artist=True,
                       showfliers=True)
    ax.set_yticks(range(1, len(cands) + 1), [c.name for c in cands])
    for patch, col in zip(parts["boxes"], _colors(cands)):
        patch.set_facecolor(col)
        patch.set_alpha(0.4)
    for i, c in enumerate(cands, start=1):
        if c.latency.p95 is not None:
            ax.plot([c.latency.p95 * 1000], [i], marker="|", markersize=14, color="red")
    ax.set_xlabel("latency per request (ms; red tick: p95)")
    ax.set_title("Response time")
    return _png(fig)


def plot_learning_curve(comparison: Comparison) -> str | None:
    """Every trainable candidate's curve with its 95% band, the prompts' measured metric as dashed
    lines (they need no training data), the majority class dotted, and the crossover point."""
    curve = comparison.learning_curve
    if curve is None:
        return None
    series = list(curve.series)
    if not series and curve.points:  # a comparison made before the series existed: the fine-tune alone
        series = [CurveSeries(candidate=curve.candidate, kind="ft", points=curve.points)]
    series = [s for s in series if any(p.n_train is not None for p in s.points)]
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    used: set[str] = set()
    ticks: set[int] = set()
    for s in series:
        col = COLORS.get(s.kind) if s.kind != "baseline" else None
        if col is None or col in used:
            col = next(x for x in EXTRA_COLORS + [f"C{j}" for j in range(10)] if x not in used)
        used.add(col)
        points = sorted((p for p in s.points if p.n_train is not None), key=lambda p: p.n_train)
        xs = [p.n_train for p in points]
        ticks.update(xs)
        ys = [p.metric.value or 0.0 for p in points]
        lo, hi = zip(*(_bounds(p.metric, v) for p, v in zip(points, ys)))
        what = {"ft": "fine-tuned", "baseline": "baseline", "prompt": "prompt, demos from n"}.get(s.kind, s.kind)
        ax.plot(xs, ys, marker="o", color=col, label=f"{s.candidate} ({what})")
        ax.fill_between(xs, lo, hi, color=col, alpha=0.12)
    for c, col in zip(comparison.candidates, _colors(comparison.candidates)):
        if c.kind == "prompt" and c.metric.value is not None and c.name not in {s.candidate for s in series}:
            ax.axhline(c.metric.value, color=col, linestyle="--", linewidth=1, label=c.name)
        if c.kind == "baseline" and c.name.startswith("baseline:majority") and c.metric.value is not None:
            ax.axhline(c.metric.value, color="#718096", linestyle=":", linewidth=1, label=f"{c.name} (chance)")
    cross = curve.crossover
    if cross is not None and cross.n_train is not None:
        ax.axvline(cross.n_train, color="#e53e3e", linestyle="-.", linewidth=1.2,
                   label=f"crossover ~{cross.n_train:,.0f} examples")
    import textwrap

    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(sorted(ticks), [f"{t:,}" for t in sorted(ticks)])  # the measured sizes
    ax.set_xlabel("labelled training examples (log scale)")
    ax.set_ylabel(comparison.metric)
    title = "Data requirements: learning curves" + (
        f" (each point on {curve.n_eval:,} of the {comparison.dataset.n_examples:,} test examples)"
        if curve.n_eval and curve.n_eval < comparison.dataset.n_examples else "") + (
        f"\n{cross.text}" if cross is not None else "")
    ax.set_title("\n".join(textwrap.fill(line, 100) for line in title.split("\n")), fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def plot_confusion(cand: CandidateEntry) -> str | None:
    conf = cand.confusion
    if conf is None or not conf.labels or not conf.matrix or len(conf.labels) > 60:  # unreadable beyond
        return None
    plt = _plt()
    labels, matrix = conf.labels, conf.matrix
    n = len(labels)
    size = min(8, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    top = max((max(r) for r in matrix if r), default=0) or 1
    if n <= 20:
        for i, r in enumerate(matrix):
            for j, v in enumerate(r):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if v > top / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("expected")
    ax.set_title(cand.name, fontsize=9)
    return _png(fig)


def plot_training(cand: CandidateEntry) -> str | None:
    curves = cand.training_curves
    if curves is None or not (curves.train_loss or curves.val_loss or curves.val_metric):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if curves.train_loss:
        ax.plot([p[0] for p in curves.train_loss], [p[1] for p in curves.train_loss], label="train loss",
                color="#4a5568", linewidth=1)
    if curves.val_loss:
        ax.plot([p[0] for p in curves.val_loss], [p[1] for p in curves.val_loss], label="validation loss",
                color=COLORS["ft"], marker="o")
    ax.set_xlabel(curves.x_label)
    ax.set_ylabel("loss")
    if curves.val_metric:
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in curves.val_metric], [p[1] for p in curves.val_metric], label="validation metric",
                 color=COLORS["hybrid"], marker="s")
        ax2.set_ylabel("validation metric")
        ax2.legend(fontsize=8, loc="lower right")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"Training curves: {cand.name}", fontsize=10)
    return _png(fig)


def plot_search(cand: CandidateEntry) -> str | None:
    """The trials of the search that made a fine-tune: curves by epoch, and each trial's score."""
    if cand.search is None or not cand.search.trials:
        return None
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.3))
    finetune.draw_trials(left, right, [t.model_dump() for t in cand.search.trials], cand.search.best_trial)
    fig.suptitle(f"Hyperparameter search: {cand.name} is trial {cand.search.best_trial}", fontsize=10)
    return _png(fig)


def plot_routing(comparison: Comparison) -> str | None:
    cands = [c for c in comparison.candidates if c.routing is not None]
    if not cands:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(cands) + 1.2))
    for y, c in enumerate(cands):
        r = c.routing
        left = 0.0
        parts = [("primary", r.primary, COLORS["ft"])]
        if r.reasons:
            parts += [(f"fallback: {k}", v, EXTRA_COLORS[i % len(EXTRA_COLORS)])
                      for i, (k, v) in enumerate(sorted(r.reasons.items()))]
        else:
            parts.append(("fallback", r.fallback, COLORS["prompt"]))
        for label, share, col in parts:
            ax.barh([y], [share], left=left, color=col, label=label if y == 0 else None)
            if share >= 0.06:
                ax.text(left + share / 2, y, f"{share:.0%}", ha="center", va="center", fontsize=8, color="white")
            left += share
    ax.set_yticks(range(len(cands)), [c.name for c in cands])
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of requests")
    ax.set_title("Hybrid router: who answered")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3)
    return _png(fig)


def plot_fields(comparison: Comparison) -> str | None:
    """JSON outputs: F1 of each field, one bar per candidate."""
    cands = [c for c in comparison.candidates if c.per_field]
    if not cands or not any(v.support for c in cands for v in (c.per_field or {}).values()):
        return None
    fields = sorted({f for c in cands for f, v in (c.per_field or {}).items() if v.support},
                    key=lambda f: -max((c.per_field or {}).get(f).support if f in (c.per_field or {}) else 0
                                       for c in cands))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(fields) * max(1, len(cands)) / 2 + 1.5))
    height = 0.8 / len(cands)
    for k, (c, col) in enumerate(zip(cands, _colors(cands))):
        ys = [i + k * height for i in range(len(fields))]
        vals = [((c.per_field or {}).get(f).f1 if f in (c.per_field or {}) else None) or 0.0 for f in fields]
        ax.barh(ys, vals, height=height, color=col, label=c.name)
    support = {f: max(c.per_field[f].support for c in cands if f in (c.per_field or {})) for f in fields}
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(fields))], [f"{f} ({support[f]})" for f in fields])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("field F1 (support: expected occurrences)")
    ax.set_title("JSON fields: who gets which field right")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def plot_scores(comparison: Comparison) -> str | None:
    """Generative outputs: the distribution of the per-example primary metric of each candidate."""
    cands = [c for c in comparison.candidates if c.scores]
    if comparison.output_type == "label" or not cands:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(cands) + 1.5))
    parts = ax.boxplot([c.scores for c in cands], vert=False, patch_artist=True, showmeans=True)
    for patch, col in zip(parts["boxes"], _colors(cands)):
        patch.set_facecolor(col)
        patch.set_alpha(0.4)
    ax.set_yticks(range(1, len(cands) + 1), [c.name for c in cands])
    ax.invert_yaxis()
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel(f"{comparison.metric} per example (box: quartiles; triangle: mean)")
    ax.set_title("Score distribution")
    return _png(fig)


def plots(comparison: Comparison) -> list[dict[str, str]]:
    """Every plot of the report: [{"id", "title", "src"}] with data: URLs."""
    out = []

    def add(pid: str, title: str, src: str | None) -> None:
        if src:
            out.append({"id": pid, "title": title, "src": src})

    add("metric", "Quality", plot_metric(comparison))
    add("cost", "Cost against volume", plot_cost(comparison))
    add("scores", "Score distribution", plot_scores(comparison))
    add("fields", "Per-field F1", plot_fields(comparison))
    add("latency", "Latency", plot_latency(comparison))
    add("routing", "Hybrid traffic share", plot_routing(comparison))
    add("learning-curve", "Learning curve", plot_learning_curve(comparison))
    for i, c in enumerate(comparison.candidates):
        add(f"confusion-{i}", f"Confusion matrix: {c.name}", plot_confusion(c))
    for i, c in enumerate(comparison.candidates):
        add(f"training-{i}", f"Training curves: {c.name}", plot_training(c))
        add(f"search-{i}", f"Hyperparameter search: {c.name}", plot_search(c))
    return out


# -- the page --------------------------------------------------------------------------------------
def render_html(comparison: Comparison) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )
    header, rows = table_rows(comparison)
    figures = plots(comparison)
    return env.get_template("report.html.j2").render(
        c=comparison, header=header, rows=rows, figures=[f for f in figures if not f["id"].startswith(("confusion", "training"))],
        confusions=[f for f in figures if f["id"].startswith("confusion")],
        trainings=[f for f in figures if f["id"].startswith("training")],
        fmt_money=fmt_money, fmt_seconds=fmt_seconds, fmt_interval=fmt_interval, fmt_p=fmt_p, fmt_months=fmt_months,
    )


def write_report(comparison: Comparison, html_path: str | Path) -> tuple[Path, Path]:
    """Write the HTML report and its JSON twin (`report.json`, or NAME.json beside NAME.html)."""
    html_path = Path(html_path)
    json_path = html_path.with_name("report.json") if html_path.name == "report.html" else html_path.with_suffix(".json")
    write_json(json_path, comparison.to_json())
    write_atomic(html_path, render_html(comparison))
    return html_path, json_path
