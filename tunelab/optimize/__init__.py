"""Prompt optimization: search instructions and few-shot demos on the validation split, and keep
the winner as a new prompt version (see `tunelab.optimize.search`).

    from tunelab.optimize import optimize
    result = optimize(ws, "support", "support", budget=20, objective="macro_f1")
    result.candidate, result.setup     # "support@3f2a9c81d0e4"; what the search took

Modules: `search` (the search and the `optimizations` rows it owns), `trials` (budget, trials,
building prompts, the winner), `space` (instruction variants), `proposer` (rewrites from failures).
"""

from tunelab.optimize.result import OptimizationResult, find_optimization, setup_of
from tunelab.optimize.search import optimize
from tunelab.optimize.trials import Budget, Trial, choose_winner

__all__ = ["Budget", "OptimizationResult", "Trial", "choose_winner", "find_optimization", "optimize", "setup_of"]
