"""`tunelab data`: every malformed file is a one-line error naming the file (and line/field), exit
status 2, no traceback, and a failed import writes nothing; good files import, list, show, split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.datasets import dataset_rows, get_dataset
from tunelab.errors import NotFound

BAD = Path(__file__).parent / "bad_inputs" / "data"

# file -> the location the error must name (file name, then line and/or field where there is one)
MALFORMED = {
    "broken_json_line.jsonl": "broken_json_line.jsonl:3",
    "empty.jsonl": "empty.jsonl: is empty",
    "blank_lines_only.jsonl": "blank_lines_only.jsonl: has only blank lines",
    "missing_output.jsonl": "missing_output.jsonl:2: field 'output'",
    "missing_input.jsonl": "missing_input.jsonl:1: field 'input'",
    "number_output.jsonl": "number_output.jsonl:2: field 'output'",
    "object_output.jsonl": "object_output.jsonl:1: field 'output'",
    "null_output.jsonl": "null_output.jsonl:2: field 'output'",
    "empty_output.jsonl": "empty_output.jsonl:2: field 'output'",
    "number_input.jsonl": "number_input.jsonl:1: field 'input'",
    "array_line.jsonl": "array_line.jsonl:2",
    "pretty_json_array.jsonl": "pretty_json_array.jsonl:1",
    "latin1.jsonl": "latin1.jsonl:2",
    "binary_garbage.jsonl": "binary_garbage.jsonl: is a binary file",
    "utf16.jsonl": "utf16.jsonl: is UTF-16",
    "ragged.csv": "ragged.csv:3",
    "header_only.csv": "header_only.csv:1",
    "missing_column.csv": "missing_column.csv:1: field 'input'",
    "latin1.csv": "latin1.csv:3",
    "empty.csv": "empty.csv: is empty",
    "chat_unknown_role.jsonl": "chat_unknown_role.jsonl:2: field 'messages[0].role'",
    "chat_messages_not_list.jsonl": "chat_messages_not_list.jsonl:1: field 'messages'",
    "chat_no_assistant.jsonl": "chat_no_assistant.jsonl:1: field 'messages[1].role'",
    "chat_non_string_content.jsonl": "chat_non_string_content.jsonl:1: field 'messages[0].content'",
    "mixed_chat_and_plain.jsonl": "mixed_chat_and_plain.jsonl:2: field 'messages'",
    "data.txt": "data.txt: unsupported file type",
}


def test_the_corpus_is_complete():
    on_disk = {p.name for p in BAD.iterdir() if p.is_file()}
    assert on_disk == set(MALFORMED), "every malformed file needs an expected location, and vice versa"
    assert len(on_disk) >= 15


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_file_check_names_the_place_and_exits_2(workspace, cli, name):
    result = cli("data", "check", BAD / name)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert MALFORMED[name] in result.stderr  # the one-line error on stderr names file and line/field
    assert str(BAD / name) in result.stderr


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_file_import_is_refused_and_writes_nothing(workspace, cli, name):
    result = cli("data", "import", BAD / name, "--name", "bad")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert MALFORMED[name] in result.stderr
    assert "nothing was imported" in result.stderr
    with pytest.raises(NotFound):
        get_dataset(workspace, "bad")
    assert dataset_rows(workspace) == []
    assert not (workspace.artifacts_dir / "datasets" / "bad").exists()


def test_folder_with_one_bad_file_is_refused_whole(workspace, cli, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"input": "a", "output": "x"}) + "\n")
    (folder / "test.jsonl").write_bytes((BAD / "broken_json_line.jsonl").read_bytes())
    result = cli("data", "import", folder, "--name", "mixed")
    assert result.exit_code == 2
    assert f"{folder / 'test.jsonl'}:3" in result.stderr
    assert dataset_rows(workspace) == []


def test_missing_path_and_bad_name_are_user_errors(workspace, cli, tmp_path):
    missing = cli("data", "import", tmp_path / "nope.jsonl")
    assert missing.exit_code == 2 and "no such file or folder" in missing.stderr
    bad_name = cli("data", "import", BAD / "ragged.csv", "--name", "no spaces please")
    assert bad_name.exit_code == 2 and "invalid dataset name" in bad_name.stderr
    unknown = cli("data", "check", "nosuchdataset")
    assert unknown.exit_code == 2 and "unknown dataset 'nosuchdataset'" in unknown.stderr


def test_import_list_show_check_split_a_shared_dataset(workspace, cli, shared_data):
    result = cli("data", "import", shared_data / "sms_spam", "--name", "spam")
    assert result.exit_code == 0, result.output
    assert "train 2000, validation 300, test 500" in result.stdout

    listed = json.loads(cli("data", "list", "--json").stdout)
    assert [(d["name"], d["splits"], d["labels"]) for d in listed] == [
        ("spam", {"train": 2000, "validation": 300, "test": 500}, ["ham", "spam"])]
    assert "spam" in cli("data", "list").stdout

    shown = json.loads(cli("data", "show", "spam", "--split", "test", "--limit", "3", "--json").stdout)
    first_test = json.loads((shared_data / "sms_spam" / "test.jsonl").read_text().splitlines()[0])
    assert shown["split"] == "test" and len(shown["examples"]) == 3
    assert shown["examples"][0] == first_test
    assert cli("data", "show", "spam", "--split", "nope").exit_code == 2

    report = json.loads(cli("data", "check", "spam", "--json").stdout)
    assert report["ok"] and report["splits"] == {"train": 2000, "validation": 300, "test": 500}
    assert report["label_counts"]["train"]["ham"] + report["label_counts"]["train"]["spam"] == 2000

    split = cli("data", "split", "spam", "--test", "0.2", "--validation", "0.1", "--seed", "3")
    assert split.exit_code == 0, split.output
    newest = get_dataset(workspace, "spam")
    sizes = {s: len(v) for s, v in newest.splits.items()}
    assert sum(sizes.values()) == 2800 and newest.version != report["source"].split("@")[1]
    assert abs(sizes["test"] / 2800 - 0.2) < 0.01 and abs(sizes["validation"] / 2800 - 0.1) < 0.01
    assert len(dataset_rows(workspace, "spam")) == 2


def test_check_json_output_is_machine_readable_even_with_errors(workspace, cli):
    result = cli("data", "check", BAD / "ragged.csv", "--json")
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["n_errors"] == 1
    assert report["issues"][0]["line"] == 3 and report["issues"][0]["kind"] == "ragged"


def test_five_megabyte_example_and_conflicts_are_warnings(workspace, cli, tmp_path):
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        f.write(json.dumps({"input": "hello there", "output": "ham"}) + "\n")
        f.write(json.dumps({"input": "word " * 1_000_000, "output": "ham"}) + "\n")
        f.write(json.dumps({"input": "Win  money", "output": "spam"}) + "\n")
        f.write(json.dumps({"input": "win money", "output": "ham"}) + "\n")
    checked = cli("data", "check", path)
    assert checked.exit_code == 0, checked.output
    assert "example at line 2 is 5.0 MB" in checked.stdout and "will be truncated" in checked.stdout
    assert "conflicting duplicates" in checked.stdout
    imported = cli("data", "import", path, "--name", "big")
    assert imported.exit_code == 0, imported.output
    assert "example at line 2 is 5.0 MB" in imported.stderr
    assert len(get_dataset(workspace, "big").split("train")) == 4


def test_options_map_fields_and_serialize_json_outputs(workspace, cli, tmp_path):
    path = tmp_path / "slots.jsonl"
    path.write_text(json.dumps({"text": "table for two", "slots": {"people": "two"}}) + "\n")
    refused = cli("data", "import", path, "--input-field", "text", "--output-field", "slots")
    assert refused.exit_code == 2 and "--json-output" in refused.stderr
    ok = cli("data", "import", path, "--input-field", "text", "--output-field", "slots", "--json-output")
    assert ok.exit_code == 0, ok.output
    ex = get_dataset(workspace, "slots").split("train")[0]
    assert (ex.input, json.loads(ex.output)) == ("table for two", {"people": "two"})


def test_every_data_command_has_help(cli):
    for command in ("import", "check", "split", "list", "show"):
        result = cli("data", command, "--help")
        assert result.exit_code == 0
        assert "Usage" in result.stdout and len(result.stdout.splitlines()) > 4
