"""Prompt optimization: search instructions and few-shot demos on the validation split, and keep
the winner as a new prompt version (see `tunelab.optimize.search`).

    from tunelab.optimize import optimize
    result = optimize(ws, "support", "support", budget=20, objective="macro_f1")
"""

from tunelab.optimize.search import Budget, OptimizationResult, optimize

__all__ = ["Budget", "OptimizationResult", "optimize"]
