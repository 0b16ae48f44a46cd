"""`tunelab flow` on JSON and text data: the output type and schema inferred from the train
outputs, the prompts it writes, and the one-line errors of bad input."""

from __future__ import annotations

import json

import pytest

from tunelab.errors import UserError
from tunelab.flow import flow_for, infer_output, infer_schema
from tunelab.metrics import schema_validator
from tunelab.prompts import parse_prompt

SLOTS = [{"people": "4 people", "time": "7pm"}, {}, {"date": "tomorrow"}, {"first_name": "Ann", "last_name": "Lee"}]


def write(folder, rows_by_split):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def json_rows(n):
    return [{"input": f"message {i}", "output": json.dumps(SLOTS[i % 4])} for i in range(n)]


def text_rows(n):
    return [{"input": f"A{i} | CITY | B{i}", "output": f"A{i} is in the city of B{i}, a long sentence {i}.",
             "meta": {"refs": [f"A{i} is in B{i}.", f"B{i} is where A{i} is."]}} for i in range(n)]


def test_the_output_type_comes_from_the_train_outputs():
    assert infer_output([json.dumps(s) for s in SLOTS]) == "json"
    assert infer_output(["spam", "ham", "spam"]) == "label"
    assert infer_output([f"sentence number {i}" for i in range(60)]) == "text"  # too many distinct outputs
    assert infer_output(["a" * 100, "b"]) == "text"  # too long for a label
    assert infer_output(['{"a": 1}'] + [f"not json {i}" for i in range(60)]) == "text"


def test_the_inferred_schema_accepts_every_train_output_and_nothing_else():
    outputs = [json.dumps(s) for s in SLOTS]
    schema = infer_schema(outputs)
    v = schema_validator(schema)
    assert all(v.is_valid(json.loads(o)) for o in outputs)
    assert schema["additionalProperties"] is False and "required" not in schema  # every slot is optional
    assert not v.is_valid({"venue": "x"}) and not v.is_valid({"people": 4})


def test_a_json_flow_writes_a_schema_prompt_a_constrained_one_and_a_short_one(tmp_path):
    src = write(tmp_path / "slots", {"train": json_rows(40), "validation": json_rows(8), "test": json_rows(8)})
    flow = flow_for(src)
    assert flow.output_type == "json" and flow.constrained_prompt == "slots-constrained"
    base = parse_prompt(flow.base_prompt_text, flow.base_prompt)
    strict = parse_prompt(flow.constrained_prompt_text, flow.constrained_prompt)
    short = parse_prompt(flow.short_prompt_text, flow.short_prompt)
    assert base.output.type == "json" and base.output.schema == infer_schema([r["output"] for r in json_rows(40)])
    assert strict.output.constrained and not base.output.constrained and strict.output.schema == base.output.schema
    assert short.output.schema == base.output.schema and "schema" not in short.variables  # learnt, not told
    assert '"people"' in base.render("x")[-1]["content"]  # the baseline shows the schema
    assert flow.finetune_settings["max_val_examples"] == 100


def test_a_text_flow_and_its_task(tmp_path):
    src = write(tmp_path / "dart", {"train": text_rows(60), "validation": text_rows(8), "test": text_rows(8)})
    flow = flow_for(src, task="Write one sentence.", field="Triples")
    assert flow.output_type == "text" and flow.constrained_prompt is None
    base = parse_prompt(flow.base_prompt_text, flow.base_prompt)
    assert base.output.type == "text" and base.max_tokens >= 32
    assert base.render("A | B | C")[-1]["content"] == "Write one sentence.\n\nTriples: A | B | C"


def test_a_schema_file_is_checked(tmp_path):
    src = write(tmp_path / "slots", {"train": json_rows(40)})
    good = tmp_path / "schema.json"
    good.write_text(json.dumps({"type": "object", "properties": {"people": {"type": "string"}}}))
    assert parse_prompt(flow_for(src, schema=good).base_prompt_text, "b").output.schema["properties"] == \
        {"people": {"type": "string"}}
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "objekt"}')
    with pytest.raises(UserError, match="invalid JSON schema") as exc:
        flow_for(src, schema=bad)
    assert exc.value.path is not None and "bad.json" in str(exc.value.path)
    (tmp_path / "broken.json").write_text("{type")
    with pytest.raises(UserError, match="not JSON"):
        flow_for(src, schema=tmp_path / "broken.json")
    text = write(tmp_path / "dart", {"train": text_rows(60)})
    with pytest.raises(UserError, match="--schema is for JSON outputs"):
        flow_for(text, schema=good)


def test_flow_cli_bad_refs_exit_2_with_one_line(cli, tmp_path):
    rows = text_rows(30)
    rows[3]["meta"]["refs"] = ["fine", 7]
    src = write(tmp_path / "dart", {"train": rows, "validation": text_rows(8), "test": text_rows(8)})
    res = cli("flow", src, "--dir", tmp_path / "ws", cwd=tmp_path)
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert "Traceback" not in res.output and "meta.refs[1]" in err and "train.jsonl" in err, err
