"""Evaluation: one evaluator for every candidate — a prompt version on a model, a fine-tuned model,
a hybrid — on one split, with the same metrics, tokens, latency and cost.

    cand = resolve_candidate(ws, "spam@production")     # PROMPT[@VERSION|@LABEL], ft:NAME, hybrid:NAME
    result = evaluate(ws, cand, "sms:test", limit=200, repeat=3)
    result.metrics["accuracy"]["value"], result.cost["per_1000"], result.latency["p95"]
    diff = diff_runs(ws, run_a, run_b); print(diff.verdicts)

Modules: `candidates` (what answers: Candidate, PromptCandidate, Setup), `routing` (the hybrid
candidate and its stored spec), `resolve` (names to candidates; the playground), `cache` (the
response cache), `run` (the evaluation loop), `runs` (stored runs: summaries, failures, export,
paired tests).
"""

from tunelab.evaluate.baselines import (METHODS as BASELINES, BaselineCandidate, list_baselines, parse_baseline,
                                        train_baseline)
from tunelab.evaluate.cache import CachedModel, ResponseCache
from tunelab.evaluate.candidates import (KINDS, Candidate, PromptCandidate, Setup, example_for, request_cost,
                                         sample_label)
from tunelab.evaluate.resolve import answer, finetuned_candidate, hybrid_candidate, resolve_candidate
from tunelab.evaluate.routing import (ExceptionRule, HybridCandidate, HybridSpec, NgramIndex, Route, Routing,
                                      hybrid_path, list_hybrids, merge, read_hybrid, save_hybrid)
from tunelab.evaluate.run import (DEFAULT_BATCH, evaluate, free_answer_count, free_answer_key, free_answer_sample,
                                  new_run_id, run_key, sample_indices)
from tunelab.evaluate.runs import (SCHEMA, DiffResult, RunResult, consistency, diff_runs, export_run, failure_groups,
                                   list_runs, load_run, paired_rows, run_row, run_rows, stored_metrics, summarize_run)

__all__ = ["BASELINES", "BaselineCandidate", "CachedModel", "Candidate", "DEFAULT_BATCH", "DiffResult", "ExceptionRule", "HybridCandidate",
           "HybridSpec", "KINDS", "NgramIndex", "PromptCandidate", "ResponseCache", "Route", "Routing", "RunResult",
           "SCHEMA", "Setup", "answer", "consistency", "diff_runs", "evaluate", "example_for", "export_run",
           "failure_groups", "finetuned_candidate", "free_answer_count", "free_answer_key", "free_answer_sample", "sample_indices",
           "hybrid_candidate", "hybrid_path", "list_baselines", "list_hybrids", "list_runs", "load_run", "merge", "new_run_id",
           "paired_rows", "parse_baseline", "read_hybrid", "request_cost", "resolve_candidate", "run_key", "run_row", "run_rows",
           "sample_label", "save_hybrid", "stored_metrics", "summarize_run", "train_baseline"]
