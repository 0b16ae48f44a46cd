"""Reflective rewrites: a (typically stronger) model reads the current best instruction and some
of its wrong answers, and proposes a better instruction (in the manner of GEPA and MIPROv2).

The failures it sees come from the train split, never from validation or test: validation only
selects among candidates, so a rewrite cannot be fitted to the examples that judge it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from tunelab.models.base import Request

if TYPE_CHECKING:
    from tunelab.models.base import Completion, Model

MAX_INSTRUCTION_CHARS = 2000
_TAGGED = re.compile(r"<instruction>(.*?)(?:</instruction>|$)", re.S | re.I)


@dataclass
class Failure:
    input: str
    expected: str
    got: str


def reflection_messages(instruction: str, labels: Sequence[str] | None, failures: Sequence[Failure],
                        max_chars: int = 400) -> list[dict[str, str]]:
    """The chat that asks the proposer for a better instruction."""
    shown = []
    for i, f in enumerate(failures, 1):
        text = f.input if len(f.input) <= max_chars else f.input[:max_chars] + " …"
        shown.append(f"{i}. input: {text}\n   expected: {f.expected}\n   the model answered: {f.got}")
    label_line = f"The allowed answers are: {', '.join(labels)}.\n\n" if labels else ""
    user = (
        "A small language model follows the instruction below to label texts.\n\n"
        f"<instruction>\n{instruction}\n</instruction>\n\n"
        f"{label_line}"
        "It got these examples wrong:\n\n" + "\n".join(shown) + "\n\n"
        "Write an improved instruction that would lead the model to the expected answers. "
        "Say what each label means and how to tell confusable labels apart; keep it short and "
        "general (do not quote these examples). Reply with only the new instruction between "
        "<instruction> and </instruction>."
    )
    return [
        {"role": "system", "content": "You are an expert prompt engineer."},
        {"role": "user", "content": user},
    ]


def parse_instruction(text: str) -> str | None:
    """The proposed instruction in a reply, or None when the reply holds no usable one."""
    match = _TAGGED.search(text or "")
    found = (match.group(1) if match else text or "").strip()
    found = re.sub(r"^```\w*\n?|\n?```$", "", found).strip()
    if not found or len(found) > MAX_INSTRUCTION_CHARS:
        return None
    if "{{" in found or "{%" in found or "{#" in found:  # template syntax would be rendered
        return None
    return found


def propose(model: "Model", instruction: str, labels: Sequence[str] | None, failures: Sequence[Failure],
            *, max_tokens: int = 400, seed: int = 0) -> tuple[str | None, "Completion"]:
    """Ask `model` for a rewrite: (the instruction, or None when the reply holds none; the reply)."""
    req = Request(messages=reflection_messages(instruction, labels, failures), max_tokens=max_tokens,
                  temperature=0.0, seed=seed)
    (comp,) = model.complete([req])
    return parse_instruction(comp.text), comp
