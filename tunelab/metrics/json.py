"""Metrics of JSON outputs: does it parse, does it match the schema, which fields agree."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from tunelab.errors import UserError
from tunelab.metrics.base import Answer, Metric, f1, num, ratio
from tunelab.prompts import OutputSpec


def parse_json(text: str) -> tuple[bool, Any]:
    """(ok, value): the JSON in a prediction. Whitespace and a ``` code fence around it are
    ignored, and so is text after the first complete JSON value (small models run on)."""
    s = (text or "").strip()
    if s.startswith("```"):
        s = re.sub(r"^```[a-zA-Z]*\s*", "", s)
        s = re.sub(r"\s*```\s*$", "", s)
    try:
        return True, json.loads(s)
    except (json.JSONDecodeError, ValueError):
        pass
    start = min([i for i in (s.find("{"), s.find("[")) if i >= 0], default=-1)
    if start < 0:
        return False, None
    try:
        value, _ = json.JSONDecoder().raw_decode(s[start:])
        return True, value
    except (json.JSONDecodeError, ValueError):
        return False, None


def schema_validator(schema: dict):
    """A jsonschema validator for `schema` (UserError when it is not a valid JSON Schema)."""
    import jsonschema

    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise UserError(f"the output schema is not a valid JSON schema: {exc.message}") from None
    return cls(schema)


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def field_counts(expected: Any, predicted: Any) -> tuple[int, int, int]:
    """(tp, fp, fn) over the fields of two JSON objects; a non-object prediction has no fields."""
    exp = expected if isinstance(expected, dict) else {}
    pred = predicted if isinstance(predicted, dict) else {}
    tp = sum(1 for k, v in pred.items() if k in exp and same_value(v, exp[k]))
    return tp, len(pred) - tp, len(exp) - tp


class JsonValid(Metric):
    name = "json_valid"

    def score(self, a: Answer) -> float:
        return float(parse_json(a.prediction)[0])


class JsonSchemaValid(Metric):
    name = "json_schema"

    def __init__(self, output: OutputSpec):
        if not output.schema:
            raise UserError("metric 'json_schema' needs a JSON schema in the prompt's output spec")
        self.validator = schema_validator(output.schema)

    def score(self, a: Answer) -> float:
        ok, value = parse_json(a.prediction)
        return float(ok and self.validator.is_valid(value))


class JsonMatch(Metric):
    """The parsed prediction equals the parsed expected output (exact object match)."""

    name = "json_match"

    def score(self, a: Answer) -> float:
        ok_e, exp = parse_json(a.expected)
        ok_p, pred = parse_json(a.prediction)
        if not ok_p:
            return 0.0
        if not ok_e:
            return float(a.prediction.strip() == a.expected.strip())
        if isinstance(exp, dict) and isinstance(pred, dict):
            return float(exp.keys() == pred.keys() and all(same_value(pred[k], exp[k]) for k in exp))
        return float(same_value(exp, pred))


class FieldF1(Metric):
    """Per-field agreement of JSON objects, micro-averaged over fields: a predicted field is a
    true positive when the expected object has the same key with the same value. The primary
    metric of JSON outputs: it credits every right field, where json_match gives nothing for an
    answer with one field wrong. An answer that does not parse (or is not an object) has no fields,
    as in slot-filling evaluations: in the aggregate it misses every expected field (and adds
    nothing where none was expected; format_valid and json_valid count the parse failures), and its
    own per-example score is 0 (a failure of its example, for the failures, the hybrid's tuning and
    the side-by-side outputs)."""

    binary = False

    def __init__(self, which: str = "f1"):
        self.which = which
        self.name = f"field_{which}"

    def counts(self, a: Answer) -> tuple[int, int, int]:
        ok_e, exp = parse_json(a.expected)
        ok_p, pred = parse_json(a.prediction)
        return field_counts(exp if ok_e else {}, pred if ok_p else {})

    def score(self, a: Answer) -> float | None:
        ok_p, pred = parse_json(a.prediction)
        if not ok_p or not isinstance(pred, dict):
            ok_e, exp = parse_json(a.expected)
            if not ok_e or isinstance(exp, dict):  # an unusable answer is a failure of its example
                return 0.0
        tp, fp, fn = self.counts(a)
        v = num(self.value(np.array([tp, fp, fn], float), 1))
        return None if math.isnan(v) else v

    def stats(self, answers: list[Answer]) -> np.ndarray:
        return np.array([self.counts(a) for a in answers], dtype=float).reshape(len(answers), 3)

    def value(self, sums: np.ndarray, n: int) -> np.ndarray:
        tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
        if self.which == "precision":
            v = ratio(tp, tp + fp)
        elif self.which == "recall":
            v = ratio(tp, tp + fn)
        else:
            v = f1(tp, fp, fn)
        # No fields expected or predicted anywhere: every answer agreed that there is nothing.
        return np.where((tp + fp + fn) == 0, 1.0, v)

    def details(self, answers: list[Answer]) -> dict:
        return field_details(answers)


def field_details(answers: list[Answer]) -> dict:
    """Micro precision/recall/F1 over all fields, and per field (with its support)."""
    per_field: dict[str, list[int]] = {}
    for a in answers:
        ok_e, exp = parse_json(a.expected)
        ok_p, pred = parse_json(a.prediction)
        exp = exp if ok_e and isinstance(exp, dict) else {}
        pred = pred if ok_p and isinstance(pred, dict) else {}
        for k in set(exp) | set(pred):
            c = per_field.setdefault(k, [0, 0, 0])
            if k in exp and k in pred and same_value(pred[k], exp[k]):
                c[0] += 1
            else:
                c[1] += k in pred
                c[2] += k in exp
    tot = np.array(list(per_field.values()) or [[0, 0, 0]], float).sum(0)
    return {
        "precision": num(ratio(tot[0], tot[0] + tot[1])),
        "recall": num(ratio(tot[0], tot[0] + tot[2])),
        "f1": num(f1(tot[0], tot[1], tot[2])),
        "per_field": {k: {"precision": num(ratio(tp, tp + fp)), "recall": num(ratio(tp, tp + fn)),
                          "f1": num(f1(tp, fp, fn)), "support": tp + fn}
                      for k, (tp, fp, fn) in sorted(per_field.items())},
    }
