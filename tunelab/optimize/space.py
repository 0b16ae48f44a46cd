"""The search space of instructions: variants built from patterns known to work.

Each variant is the seed prompt's own instruction (its task context) plus some of:

- a role line ("You are a careful expert annotator."),
- a definition of each label (from the prompt's `label_definitions`, else the label names),
- the output-format contract ("Answer with exactly one of: a, b, c. Reply with the label only."),
- a boundary for unclear inputs ("If none of the labels clearly applies, answer Other."),

placed in the system turn or in the user turn (small models such as SmolLM2-135M largely ignore
a system turn, so the user turn is tried too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

Placement = Literal["system", "user"]

ROLE_LINE = "You are a careful expert annotator. You read each text closely and label it consistently."
FALLBACK_NAMES = ("other", "none", "neutral", "unknown", "misc", "n/a", "no")


@dataclass(frozen=True)
class InstructionVariant:
    """One instruction to try: `parts` names the patterns it combines (for the table)."""

    name: str
    text: str
    placement: Placement

    def to_dict(self) -> dict:
        return {"name": self.name, "placement": self.placement, "text": self.text}


def fallback_label(labels: Sequence[str]) -> str | None:
    """The label that means 'none of the others' (Other, none, neutral, ...), if there is one."""
    for label in labels:
        if label.strip().lower() in FALLBACK_NAMES:
            return label
    return None


def format_contract(labels: Sequence[str]) -> str:
    return f"Answer with exactly one of: {', '.join(labels)}. Reply with the label only, nothing else."


def definitions_block(labels: Sequence[str], definitions: Mapping[str, str] | None = None) -> str:
    definitions = definitions or {}
    lines = ["The labels:"]
    for label in labels:
        text = (definitions.get(label) or "").strip()
        lines.append(f"- {label}: {text}" if text else f"- {label}")
    return "\n".join(lines)


def boundary_line(labels: Sequence[str]) -> str:
    other = fallback_label(labels)
    if other is not None:
        return f"If none of the other labels clearly applies, answer {other}."
    return "If you are unsure, answer the single most likely label; never answer anything else."


JSON_CONTRACT = "Answer with the JSON object only: no other text, no code fence."
TEXT_CONTRACT = "Answer with the text only: no preamble, no explanation."


def instruction_variants(seed_instruction: str, labels: Sequence[str] | None, *,
                         seed_placement: Placement = "system",
                         definitions: Mapping[str, str] | None = None,
                         output_type: str = "label") -> list[InstructionVariant]:
    """The instruction variants to try, the seed's own first. Without labels (JSON or free-text
    outputs) the role line, the output-format contract and the placement vary."""
    task = seed_instruction.strip() or "Classify the text."
    other_place: Placement = "user" if seed_placement == "system" else "system"
    variants: list[InstructionVariant] = [InstructionVariant("seed", task, seed_placement)]
    if seed_placement == "system":
        variants.append(InstructionVariant("seed in user turn", task, "user"))

    def add(name: str, parts: list[str], placement: Placement = "user") -> None:
        text = "\n\n".join(p for p in parts if p)
        if all(v.text != text or v.placement != placement for v in variants):
            variants.append(InstructionVariant(name, text, placement))

    if not labels:
        contract = JSON_CONTRACT if output_type == "json" else TEXT_CONTRACT
        add("format", [task, contract])
        add("role", [ROLE_LINE, task])
        add("role+format", [ROLE_LINE, task, contract])
        add("role", [ROLE_LINE, task], other_place)
        return variants
    contract = format_contract(labels)
    defs = definitions_block(labels, definitions)
    bound = boundary_line(labels)
    add("format", [task, contract])
    add("role+format", [ROLE_LINE, task, contract])
    add("labels+format", [task, defs, contract])
    add("labels+format+boundary", [task, defs, contract + " " + bound])
    add("role+labels+format+boundary", [ROLE_LINE, task, defs, contract + " " + bound])
    add("role+labels+format+boundary (system)", [ROLE_LINE, task, defs, contract + " " + bound], "system")
    add("format (system)", [task, contract], "system")
    return variants
