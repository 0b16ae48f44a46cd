"""Personal data in logged inputs, found before they become training data: e-mail addresses,
phone numbers, payment card numbers (Luhn-checked), IBANs and IP addresses in the texts, and
template variables whose names say they hold personal data (`email`, `phone`, `name`, ...).

    report = find_pii(examples)      # PiiReport: counts per kind, fields, which examples
    report.found, report.summary()   # "email: 3, phone: 1; fields: customer_email"

The patterns are deliberately broad (a reviewer confirms what they flag): `tunelab distill` stops
with the summary until the user says to keep or drop those examples.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from tunelab.datasets import Example

PATTERNS = {
    "email": re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}"),
    "phone": re.compile(r"(?<![\w+.])(?:\+\d{1,3}[ \-]?)?(?:\(\d{1,4}\)[ \-]?)?\d{2,4}(?:[ \-]\d{2,4}){2,4}(?![\w.])"),
    "card": re.compile(r"(?<!\d)(?:\d[ \-]?){13,19}(?!\d)"),
    "iban": re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"),
    "ip": re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\d.])"),
}
OWN_KEYS = {"call_id"}  # what tunelab adds to a logged example (a call id's hex can look like a card number)
FIELD_WORDS = re.compile(r"e-?mail|phone|mobile|name|address|street|zip|postcode|birth|ssn|passport|iban|card|ip_?addr",
                         re.IGNORECASE)


def _luhn(digits: str) -> bool:
    total, odd = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if odd:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        odd = not odd
    return total % 10 == 0


def kinds_in(text: str) -> list[str]:
    """The kinds of personal data `text` seems to hold (a phone number inside a card number or
    an IBAN counts as that)."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for kind, rx in PATTERNS.items():
        for m in rx.finditer(text or ""):
            if kind == "card":
                digits = re.sub(r"\D", "", m.group(0))
                if not (13 <= len(digits) <= 19 and _luhn(digits)):
                    continue
            if kind == "phone" and sum(c.isdigit() for c in m.group(0)) < 9:  # a date has 8
                continue
            spans.setdefault(kind, []).append(m.span())
    others = [sp for kind, sps in spans.items() if kind != "phone" for sp in sps]
    phones = [sp for sp in spans.get("phone", []) if not any(a < sp[1] and sp[0] < b for a, b in others)]
    if phones:
        spans["phone"] = phones
    else:
        spans.pop("phone", None)
    return [kind for kind in PATTERNS if kind in spans]


@dataclass
class PiiReport:
    kinds: Counter = field(default_factory=Counter)  # kind -> examples
    fields: list[str] = field(default_factory=list)  # variable names that suggest personal data
    flagged: list[int] = field(default_factory=list)  # indices of the examples concerned

    @property
    def found(self) -> bool:
        return bool(self.flagged)

    def summary(self) -> str:
        parts = [", ".join(f"{k}: {n}" for k, n in self.kinds.most_common())] if self.kinds else []
        if self.fields:
            parts.append("fields: " + ", ".join(self.fields))
        return "; ".join(parts) or "nothing found"

    def to_dict(self) -> dict:
        return {"kinds": dict(self.kinds), "fields": self.fields, "examples": len(self.flagged)}


def find_pii(examples: Sequence[Example]) -> PiiReport:
    """What looks like personal data in the inputs and variables of `examples`."""
    report = PiiReport()
    fields: set[str] = set()
    for i, ex in enumerate(examples):
        kinds: set[str] = set(kinds_in(ex.input))
        meta = {k: v for k, v in ex.meta.items() if k not in OWN_KEYS}
        named = [k for k, v in meta.items() if FIELD_WORDS.search(str(k)) and v not in (None, "")]
        for v in meta.values():
            if isinstance(v, str):
                kinds.update(kinds_in(v))
        if kinds or named:
            report.flagged.append(i)
            report.kinds.update(kinds)
            fields.update(named)
    report.fields = sorted(fields)
    return report
