"""`tunelab prompt ...` and `tunelab run`: through the real command-line error handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BAD = Path(__file__).parent / "bad_inputs" / "prompts"

# file -> (line the error names, words the message must contain)
MALFORMED = {
    "yaml_error.prompt": (4, ["YAML error", "line 3"]),
    "unknown_key.prompt": (3, ["unknown key 'temprature'", "did you mean 'temperature'"]),
    "unknown_nested_key.prompt": (4, ["unknown key 'output.label'"]),
    "demo_missing_output.prompt": (5, ["demos.1.output", "required"]),
    "bad_value.prompt": (2, ["field 'temperature'", "number"]),
    "label_without_labels.prompt": (2, ["field 'output'", "labels"]),
    "unclosed_front_matter.prompt": (1, ["front matter is not closed"]),
    "jinja_syntax.prompt": (7, ["template syntax error"]),
    "jinja_unclosed_block.prompt": (7, ["template syntax error", "endfor"]),
    "undefined_variable.prompt": (6, ["undefined variable: 'question'"]),
    "leaks_gold_output.prompt": (6, ["undefined variable: 'output'"]),
    "no_user_part.prompt": (None, ["no user part"]),
    "sandbox_mro.prompt": (6, ["unsafe template", "__class__"]),
    "sandbox_subclasses.prompt": (4, ["unsafe template", "__subclasses__"]),
    "sandbox_globals.prompt": (4, ["unsafe template", "__globals__"]),
    "sandbox_template_reference.prompt": (4, ["unsafe template", "_TemplateReference__context"]),
    "sandbox_dynamic_attr.prompt": (4, ["unsafe template", "__class__"]),
    "invalid_schema.prompt": (3, ["field 'output'", "invalid JSON schema", "objekt"]),
    "constrained_text.prompt": (3, ["'constrained: true' is only for type json"]),
    "judge_no_scale.prompt": (4, ["field 'output.judge.scale'", "required"]),
}

SMS = """---
output: {type: label, labels: [spam, ham]}
demos:
  - {input: "WIN a free prize now", output: spam}
---
system:
Classify the message as one of: {{ labels | join(", ") }}.
user:
Message: {{ input }}
"""


def test_the_corpus_is_covered():
    assert sorted(p.name for p in BAD.glob("*.prompt")) == sorted(MALFORMED)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_prompt_check_exits_2_naming_file_and_line(cli, tmp_path, name):
    line, words = MALFORMED[name]
    res = cli("prompt", "check", BAD / name, cwd=tmp_path)  # outside any workspace
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    err = res.stderr.strip()
    assert "Traceback" not in res.output and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {BAD / name}" + (f":{line}:" if line else ":")), err
    for word in words:
        assert word in err, err


def test_malformed_prompt_in_a_real_process_has_no_traceback(tmp_path):
    tunelab = str(Path(sys.executable).with_name("tunelab"))
    out = subprocess.run([tunelab, "prompt", "check", str(BAD / "sandbox_mro.prompt")], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "sandbox_mro.prompt:6: unsafe template" in out.stderr


def test_check_renders_a_sample(cli, workspace):
    (workspace.prompts_dir / "sms.prompt").write_text(SMS)
    res = cli("prompt", "check", "prompts/sms.prompt", "--input", "free cash!!")
    assert res.exit_code == 0, res.output
    assert "ok: prompts/sms.prompt" in res.stdout and "Message: free cash!!" in res.stdout
    res = cli("prompt", "check", "sms", "--json")
    data = json.loads(res.stdout)
    assert data["output"] == {"type": "label", "labels": ["spam", "ham"]} and data["max_tokens"] == 16
    assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant", "user"]
    assert data["messages"][-1]["content"] == "Message: This is a sample input."


def test_check_with_fields_and_a_dataset(cli, workspace):
    from tunelab.datasets import Example, save_dataset

    save_dataset(workspace, "qa", {"train": [Example("Who?", "Ada", {"context": "Ada wrote it."})]})
    (workspace.prompts_dir / "qa.prompt").write_text("---\n---\nsystem:\n{{ context }}\nuser:\n{{ input }}\n")
    res = cli("prompt", "check", "qa")
    assert res.exit_code == 2 and "undefined variable: 'context'" in res.stderr and "--data" in res.stderr
    res = cli("prompt", "check", "qa", "--data", "qa", "--json")
    assert json.loads(res.stdout)["messages"][0]["content"] == "Ada wrote it."
    res = cli("prompt", "check", "qa", "-i", "Q", "--field", "context=C", "--json")
    assert [m["content"] for m in json.loads(res.stdout)["messages"]] == ["C", "Q"]
    assert cli("prompt", "check", "qa", "--field", "nonsense").exit_code == 2


def test_versions_through_the_cli(cli, workspace):
    path = workspace.prompts_dir / "sms.prompt"
    path.write_text(SMS)
    empty = cli("prompt", "commit", "sms", "-m", "  ")
    assert empty.exit_code == 2 and "needs a message" in empty.stderr
    res = cli("prompt", "commit", "sms", "-m", "first", "--json")
    v1 = json.loads(res.stdout)["version"]
    again = cli("prompt", "commit", "sms", "-m", "again")
    assert again.exit_code == 2 and "nothing to commit" in again.stderr
    path.write_text(SMS.replace("Message:", "SMS:"))
    assert cli("prompt", "diff", "sms").stdout.count("+SMS: {{ input }}") == 1
    v2 = json.loads(cli("prompt", "commit", "sms", "-m", "second", "--author", "bob", "--json").stdout)["version"]

    log = json.loads(cli("prompt", "log", "sms", "--json").stdout)
    assert [(c["version"], c["parent"], c["message"]) for c in log] == [(v2, v1, "second"), (v1, None, "first")]
    assert log[0]["author"] == "bob"
    assert v2 in cli("prompt", "log", "sms").stdout

    assert cli("prompt", "tag", f"sms@{v1[:5]}", "production").exit_code == 0
    assert "Message: {{ input }}" in cli("prompt", "show", "sms@production").stdout
    diff = cli("prompt", "diff", "sms@production", "sms@current").stdout
    assert "-Message: {{ input }}" in diff and "+SMS: {{ input }}" in diff
    assert "no differences" in cli("prompt", "diff", "sms").stdout

    res = cli("prompt", "rollback", "sms", "production")
    assert res.exit_code == 0, res.output
    assert "Message: {{ input }}" in path.read_text()
    log = json.loads(cli("prompt", "log", "sms", "--json").stdout)
    assert (log[0]["version"], log[0]["parent"], log[0]["message"]) == (v1, v2, f"rollback to {v1}")
    assert log[0]["labels"] == ["production"]
    (row,) = json.loads(cli("prompt", "list", "--json").stdout)
    assert row["status"] == "clean" and row["current"] == v1 and row["commits"] == 3

    missing = cli("prompt", "show", "sms@nope")
    assert missing.exit_code == 2 and "no version or label 'nope'" in missing.stderr


def test_run_with_the_fake_model(cli, workspace):
    (workspace.prompts_dir / "sms.prompt").write_text(SMS)
    res = cli("run", "sms", "--input", "spam spam spam", "--model", "fake")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == "spam"
    assert any(line.split()[:2] == ["spam", "70.0%"] for line in lines)
    assert "prompt +" in res.stdout and "completion tokens" in res.stdout and " ms" in res.stdout
    data = json.loads(cli("run", "sms", "-i", "hello ham", "--model", "fake", "--json").stdout)
    assert data["output"] == "ham" and abs(sum(data["label_probs"].values()) - 1) < 1e-9
    assert data["prompt_tokens"] > 0 and data["completion_tokens"] >= 1 and data["latency_s"] >= 0
    assert data["messages"][-1]["content"] == "Message: hello ham"
    bad = cli("run", "nope", "-i", "x", "--model", "fake")
    assert bad.exit_code == 2 and "unknown prompt 'nope'" in bad.stderr


@pytest.mark.realmodel
def test_run_on_smollm2(cli, workspace, bundled_model_dir):
    (workspace.prompts_dir / "sms.prompt").write_text(SMS)
    data = json.loads(cli("run", "sms", "-i", "Congratulations! You won a free cruise, call now",
                          "--model", "smollm2-135m", "--precision", "fp32", "--json").stdout)
    assert data["output"] in ("spam", "ham")
    assert set(data["label_probs"]) == {"spam", "ham"} and abs(sum(data["label_probs"].values()) - 1) < 1e-6
    assert data["prompt_tokens"] > 20 and data["latency_s"] > 0
    (workspace.prompts_dir / "chat.prompt").write_text("---\nmax_tokens: 8\n---\nSay hello to {{ input }}.\n")
    res = cli("run", "chat", "-i", "Ada", "--model", "smollm2-135m")
    assert res.exit_code == 0, res.output
    assert "completion tokens" in res.stdout
