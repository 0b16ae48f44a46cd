"""What an optimization found (`OptimizationResult`: its `.candidate` and `.setup`), and the finished
optimizations read back from the `optimizations` rows the search writes: what made a prompt
version (the comparison's setup cost) and a search to reuse (the flow).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from tunelab.evaluate import Setup
from tunelab.store.models import OptimizationRow

if TYPE_CHECKING:
    from tunelab.workspace import Workspace


@dataclass
class OptimizationResult:
    """What `optimize` found. `winner` and `seed` are trial dicts (see `Trial.to_dict`)."""

    id: str
    prompt: str
    seed_version: str
    dataset: str
    dataset_version: str
    model: str
    objective: str
    improved: bool
    version: str | None  # the committed version, None when nothing beat the seed
    message: str  # the outcome in plain words
    winner: dict[str, Any]
    seed: dict[str, Any]
    candidates: list[dict[str, Any]]
    budget: dict[str, Any]
    wall_s: float
    tokens: int
    cost: float
    validation_n: int
    test: dict[str, Any] | None = None  # {"split", "n", "seed": {...}, "winner": {...}} after the search
    notes: list[str] = field(default_factory=list)

    @property
    def candidate(self) -> str:
        """The candidate the search made: the committed version, else the seed it could not beat."""
        return f"{self.prompt}@{self.version or self.seed_version}"

    @property
    def setup(self) -> Setup:
        """What the search took: wall time, the cost and tokens of the requests it really sent."""
        return Setup(how="optimization", wall_s=float(self.wall_s or 0.0), compute_cost=float(self.cost or 0.0),
                     tokens=int(self.tokens or 0),
                     sources=[f"optimization {self.id} ({len(self.candidates)} candidates, {self.wall_s:.0f} s)"])

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_row(cls, row: OptimizationRow) -> "OptimizationResult":
        """A finished search, from its row: the row's own columns, then its stored result."""
        result, config = row.result or {}, row.config or {}
        data = {"id": row.id, "prompt": row.prompt, "seed_version": config.get("seed_version", ""),
                "dataset": row.dataset, "dataset_version": config.get("dataset_version", ""),
                "model": config.get("model", ""), "objective": config.get("objective", ""), "improved": False,
                "version": None, "message": "", "winner": {}, "seed": {}, "budget": config.get("budget") or {},
                "validation_n": config.get("validation_n") or 0, **result,
                "candidates": row.candidates or [], "wall_s": float(row.wall_s or 0.0),
                "tokens": int(row.tokens or 0), "cost": float(row.cost or 0.0)}
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


# -- the optimizations row, for the comparison and the flow --------------------------------------------
def _done(ws: "Workspace", prompt: str) -> list[OptimizationRow]:
    with ws.store.session() as s:
        return list(s.scalars(select(OptimizationRow).where(OptimizationRow.prompt == prompt,
                                                            OptimizationRow.status == "done")
                              .order_by(OptimizationRow.created_at.desc())))


def setup_of(ws: "Workspace", prompt: str, version: str) -> Setup | None:
    """What made the prompt version `prompt@version`: the newest finished optimization that
    committed it, or that searched around it and found nothing better (that search is the prompt
    engineering it took too). None: no optimization made it (hand-written)."""
    for row in _done(ws, prompt):
        result = row.result or {}
        if result.get("version") == version or (not result.get("version") and result.get("seed_version") == version):
            return OptimizationResult.from_row(row).setup
    return None


def find_optimization(ws: "Workspace", prompt: str, seed_version: str, dataset_version: str) -> OptimizationResult | None:
    """The newest finished optimization of `prompt@seed_version` on that dataset version (the flow
    reuses it instead of searching again)."""
    for row in _done(ws, prompt):
        config = row.config or {}
        if config.get("seed_version") == seed_version and config.get("dataset_version") == dataset_version:
            return OptimizationResult.from_row(row)
    return None
