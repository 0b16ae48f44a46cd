"""Datasets: readers (JSONL, chat, CSV, folders), check findings, versions, seeded stratified splits."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from tunelab.datasets.check import _tokenizer_for
from tunelab.datasets import (
    CheckFailed, Example, check_dataset, check_examples, check_path, content_version,
    dataset_rows, get_dataset, get_split, import_dataset, normalize_input, read_file, split_dataset,
    split_examples,
)
from tunelab.errors import NotFound, UserError


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def labelled(n: int, label: str, prefix: str = "") -> list[dict]:
    return [{"input": f"{prefix}{label} message number {i}", "output": label} for i in range(n)]


# -- readers ---------------------------------------------------------------------------------

def test_jsonl_extra_fields_go_to_meta_and_fields_can_be_mapped(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"text": "hi", "label": "ham", "source": "sms", "meta": {"id": 7}},
        {"text": "win", "label": "spam", "source": "sms"},
    ])
    read = read_file(path, input_field="text", output_field="label")
    assert read.issues == [] and read.format == "jsonl" and read.lines == [1, 2]
    assert read.examples[0] == Example("hi", "ham", {"id": 7, "source": "sms"})
    assert read.examples[1].meta == {"source": "sms"}


def test_chat_records_become_input_output_with_system_and_history(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Classify SMS."},
                      {"role": "user", "content": "first"}, {"role": "assistant", "content": "ham"},
                      {"role": "user", "content": "WIN A PRIZE"}, {"role": "assistant", "content": "spam"}],
         "id": "c1"},
        {"messages": [{"role": "user", "content": "see you"}, {"role": "assistant", "content": "ham"}]},
    ])
    read = read_file(path)
    assert read.format == "chat" and read.issues == []
    first, second = read.examples
    assert (first.input, first.output) == ("WIN A PRIZE", "spam")
    assert first.meta == {"id": "c1", "system": "Classify SMS.",
                          "history": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ham"}]}
    assert second == Example("see you", "ham", {})


def test_csv_columns_map_and_lines_count_multiline_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label,lang\n"two\nlines",ham,en\nwin,spam,en,EXTRA\nbye,ham,fr\n', encoding="utf-8")
    read = read_file(path, input_field="text", output_field="label")
    assert [(e.input, e.output, e.meta) for e in read.examples] == [
        ("two\nlines", "ham", {"lang": "en"}), ("bye", "ham", {"lang": "fr"})]
    assert read.lines == [2, 5]
    [issue] = read.issues
    assert (issue.kind, issue.line) == ("ragged", 4)  # the record after the two-line cell starts at line 4


@pytest.mark.parametrize("text, line, words", [
    ('input,output\nok,ham\n"no closing quote,oops\nnext,row\nlast,spam\n', 3, "never closed"),
    ('input,output\nok,ham\n"no closing quote,"oops\nnext,row\n', 3, "after a closing quote"),
])
def test_csv_with_a_broken_quote_is_an_error_naming_its_line(tmp_path, text, line, words):
    path = tmp_path / "q.csv"
    path.write_text(text, encoding="utf-8")
    read = read_file(path)
    [issue] = [i for i in read.issues if i.level == "error"]
    assert (issue.kind, issue.line) == ("csv", line) and words in issue.message
    assert "q.csv:3" in issue.format()  # the file and the line, as the CLI prints it


def test_json_output_and_allow_empty_output_options(tmp_path):
    path = write_jsonl(tmp_path / "o.jsonl", [
        {"input": "table for 2", "output": {"people": "2"}},
        {"input": "nothing", "output": ""},
        {"input": "count", "output": 3},
    ])
    strict = read_file(path)
    assert [(i.line, i.field, i.kind) for i in strict.issues] == [
        (1, "output", "not_string"), (2, "output", "empty"), (3, "output", "not_string")]
    lenient = read_file(path, json_output=True, allow_empty_output=True)
    assert lenient.issues == []
    assert [e.output for e in lenient.examples] == ['{"people": "2"}', "", "3"]


def test_folder_splits_aliases_and_ignored_files(tmp_path):
    folder = tmp_path / "ds"
    write_jsonl(folder / "train.jsonl", labelled(3, "a"))
    write_jsonl(folder / "dev.jsonl", labelled(2, "a", "v "))
    (folder / "test.csv").write_text("input,output\nt1,a\n", encoding="utf-8")
    write_jsonl(folder / "extra.jsonl", labelled(1, "a"))
    (folder / "labels.txt").write_text("a\n")
    report, splits = check_path(folder, model="/no/such/model")
    assert {s: len(v) for s, v in splits.items()} == {"train": 3, "validation": 2, "test": 1}
    assert report.format == "mixed"
    ignored = [i for i in report.issues if i.kind == "ignored"]
    assert len(ignored) == 1 and "extra.jsonl" in ignored[0].message and ignored[0].level == "warning"
    write_jsonl(folder / "val.jsonl", labelled(1, "a"))
    report, _ = check_path(folder, model="/no/such/model")
    assert any(i.kind == "split_twice" and i.level == "error" for i in report.issues)


def test_split_option_and_unknown_split(tmp_path, workspace):
    path = write_jsonl(tmp_path / "t.jsonl", labelled(3, "a"))
    ds, _ = import_dataset(workspace, path, "t", split="test", model="/no/such/model")
    assert list(ds.splits) == ["test"]
    with pytest.raises(UserError, match="unknown split 'holdout'"):
        import_dataset(workspace, path, "t", split="holdout")


# -- check findings ----------------------------------------------------------------------------

def test_duplicates_conflicts_and_leakage_name_their_lines(tmp_path):
    folder = tmp_path / "leaky"
    write_jsonl(folder / "train.jsonl", [
        {"input": "hello", "output": "ham"},       # 1
        {"input": "Hello ", "output": "ham"},      # 2 duplicate of 1 (case/space folded)
        {"input": "free cash", "output": "spam"},  # 3
        {"input": "free  CASH", "output": "ham"},  # 4 conflicts with 3
        {"input": "see you", "output": "ham"},     # 5
    ])
    write_jsonl(folder / "test.jsonl", [{"input": "new one", "output": "ham"}, {"input": "see you", "output": "ham"}])
    report, _ = check_path(folder, model="/no/such/model")
    assert report.ok
    assert report.duplicates == {"train": 1, "test": 0} and report.conflicts == {"train": 1, "test": 0}
    assert report.leakage == {"train/test": 1}
    by_kind = {i.kind: i for i in report.issues}
    assert by_kind["duplicate"].line == 1 and "lines 1, 2" in by_kind["duplicate"].message
    conflict = by_kind["conflicting_duplicate"]
    assert conflict.line == 3 and "line 3 -> 'spam'" in conflict.message and "line 4 -> 'ham'" in conflict.message
    leak = by_kind["leakage"]
    assert leak.path.endswith("test.jsonl") and leak.line == 2 and "train.jsonl line 5" in leak.message
    assert normalize_input("  Free\tCASH ") == "free cash"


def test_label_distribution_imbalance_and_too_few_warnings():
    splits = {"train": [Example(**r) for r in labelled(44, "ham") + labelled(3, "spam")],
              "test": [Example(**r) for r in labelled(8, "ham", "t ")]}
    report = check_examples(splits, model="/no/such/model")
    assert report.output_kind == "label" and report.labels == ["ham", "spam"]
    assert report.label_counts == {"train": {"ham": 44, "spam": 3}, "test": {"ham": 8, "spam": 0}}
    assert report.imbalance["train"] == pytest.approx(44 / 3, rel=1e-2)
    kinds = Counter(i.kind for i in report.warnings)
    assert kinds["imbalance"] == 1 and kinds["few_per_label"] == 1 and kinds["label_missing"] == 1
    assert kinds["too_few"] == 1  # test has 8 examples; train 47 is enough
    balanced = check_examples({"train": [Example(**r) for r in labelled(30, "a") + labelled(30, "b")]},
                              model="/no/such/model")
    assert not any(i.kind in ("imbalance", "few_per_label", "too_few") for i in balanced.issues)


def test_json_and_text_outputs_are_not_labels():
    json_outputs = [Example(f"book {i}", json.dumps({"people": str(i)})) for i in range(30)]
    assert check_examples({"train": json_outputs}, model="/no/such/model").output_kind == "json"
    text = [Example(f"q {i}", f"a long free text answer number {i}") for i in range(30)]
    report = check_examples({"train": text}, model="/no/such/model")
    assert report.output_kind == "text" and report.labels is None and report.label_counts == {}


def test_five_megabyte_example_is_a_fast_warning_even_without_a_tokenizer(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", [{"input": "short", "output": "a"},
                                               {"input": "word " * 1_000_000, "output": "a"}])
    started = time.perf_counter()
    report, splits = check_path(path, model="/no/such/model")
    assert time.perf_counter() - started < 10
    assert report.ok and len(splits["train"]) == 2
    assert report.tokens["estimated"] is True and report.tokens["context"] == 8192
    [long] = [i for i in report.issues if i.kind == "too_long"]
    assert long.level == "warning" and long.line == 2
    assert "example at line 2 is 5.0 MB" in long.message and "will be truncated" in long.message
    assert any(i.kind == "tokenizer" and i.level == "note" for i in report.issues)


@pytest.mark.realmodel
def test_token_lengths_use_the_bundled_tokenizer_and_context(tmp_path, bundled_model_dir):
    from tunelab.models.weights import load_tokenizer

    tokenizer = load_tokenizer()
    records = [{"input": "hello " * n, "output": "ham"} for n in (1, 5, 9)]
    report, _ = check_path(write_jsonl(tmp_path / "t.jsonl", records))
    stats = report.tokens
    assert stats["estimated"] is False and stats["context"] == 8192
    direct = sorted(len(tokenizer(f"{r['input']}\n{r['output']}", add_special_tokens=False)["input_ids"])
                    + stats["template_overhead"] for r in records)
    assert stats["splits"]["train"] == {"p50": direct[1], "p95": direct[2], "max": direct[2], "over_context": 0}


# -- import, versions, failures ---------------------------------------------------------------------

def test_shared_datasets_import_with_their_splits_and_labels(workspace, shared_data):
    for folder in sorted(p for p in shared_data.iterdir() if p.is_dir()):
        ds, report = import_dataset(workspace, folder)
        assert ds.name == folder.name and report.ok
        for split in ("train", "validation", "test"):
            source = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
            assert [e.to_dict() for e in ds.split(split)] == source
        labels_file = folder / "labels.txt"
        if labels_file.exists():
            assert set(ds.labels) == set(labels_file.read_text().split("\n")) - {""}
        else:  # JSON extraction (restaurant8k_slots) or free text (dart_triples)
            first = ds.split("train")[0].output
            assert ds.labels is None and report.output_kind == ("json" if first.lstrip().startswith("{") else "text")
        again = get_dataset(workspace, folder.name)
        assert again.version == ds.version and again.labels == ds.labels


def test_check_of_a_shared_dataset_is_fast_once_the_tokenizer_is_loaded(shared_data):
    _tokenizer_for(None)
    report, _ = check_path(shared_data / "legal_unfair_tos")
    assert report.ok and report.splits["train"] == 2000
    assert report.seconds < 4, f"check took {report.seconds:.2f} s"  # ~0.5 s measured; slack for busy CI
    assert report.imbalance["train"] > 10 and any(i.kind == "imbalance" for i in report.warnings)


def test_version_is_the_content_hash(workspace, tmp_path):
    path = write_jsonl(tmp_path / "v.jsonl", labelled(5, "a") + labelled(5, "b"))
    first, _ = import_dataset(workspace, path, "v", model="/no/such/model")
    again, _ = import_dataset(workspace, path, "v", model="/no/such/model")
    assert again.version == first.version and len(dataset_rows(workspace, "v")) == 1
    assert first.version == content_version(first.splits)
    write_jsonl(path, labelled(5, "a") + labelled(4, "b"))
    changed, _ = import_dataset(workspace, path, "v", model="/no/such/model")
    assert changed.version != first.version
    assert get_dataset(workspace, "v").version == changed.version
    assert get_dataset(workspace, f"v@{first.version[:6]}").version == first.version
    ds, split, examples = get_split(workspace, f"v@{first.version}:train")
    assert (split, len(examples)) == ("train", 10)


def test_failed_import_raises_with_the_report_and_writes_nothing(workspace):
    bad = Path(__file__).parent / "bad_inputs" / "data" / "broken_json_line.jsonl"
    with pytest.raises(CheckFailed) as caught:
        import_dataset(workspace, bad, "broken")
    assert f"{bad}:3" in str(caught.value) and caught.value.report.errors[0].line == 3
    assert dataset_rows(workspace) == []
    with pytest.raises(NotFound):
        get_dataset(workspace, "broken")


def test_check_an_imported_dataset_by_name(workspace, tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", labelled(3, "a") + [{"input": "a message number 0", "output": "b"}])
    import_dataset(workspace, path, "n", model="/no/such/model")
    report = check_dataset(workspace, "n", model="/no/such/model")
    assert report.format == "dataset" and report.splits == {"train": 4}
    [conflict] = [i for i in report.issues if i.kind == "conflicting_duplicate"]
    assert conflict.path.startswith("n@") and conflict.path.endswith(":train") and conflict.line == 1


# -- splits ------------------------------------------------------------------------------------------

def _pool() -> list[Example]:
    records = labelled(120, "ham") + labelled(30, "spam") + labelled(6, "rare")
    return [Example(**r) for r in records]


def test_split_is_seeded_stratified_and_keeps_every_label_everywhere():
    pool = _pool()
    a = split_examples(pool, test=0.2, validation=0.1, seed=7)
    b = split_examples(list(reversed(pool)), test=0.2, validation=0.1, seed=7)
    assert content_version(a) == content_version(b)  # depends on content and seed, not on order
    assert content_version(split_examples(pool, test=0.2, validation=0.1, seed=8)) != content_version(a)
    assert sorted(e.input for s in a.values() for e in s) == sorted(e.input for e in pool)
    for split, share in (("test", 0.2), ("validation", 0.1)):
        counts = Counter(e.output for e in a[split])
        assert set(counts) == {"ham", "spam", "rare"}
        assert counts["ham"] == pytest.approx(120 * share, abs=1) and counts["spam"] == pytest.approx(30 * share, abs=1)
    assert Counter(e.output for e in a["train"])["rare"] >= 3


def test_split_keeps_duplicate_inputs_together():
    pool = _pool() + [Example("ham message number 3", "ham"), Example("HAM message number 3 ", "ham")]
    splits = split_examples(pool, seed=0)
    seen = {}
    for name, examples in splits.items():
        for e in examples:
            assert seen.setdefault(normalize_input(e.input), name) == name


def test_split_dataset_writes_a_new_version_with_provenance(workspace, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [e.to_dict() for e in _pool()])
    original, _ = import_dataset(workspace, path, "s", model="/no/such/model")
    new = split_dataset(workspace, "s", test=0.2, validation=0.1, seed=1)
    assert new.version != original.version and set(new.splits) == {"train", "validation", "test"}
    assert new.meta["split_from"] == original.ref and new.meta["split"]["seed"] == 1
    assert split_dataset(workspace, f"s@{original.version}", test=0.2, validation=0.1, seed=1).version == new.version
    assert len(dataset_rows(workspace, "s")) == 2
    with pytest.raises(UserError, match="split fractions"):
        split_dataset(workspace, "s", test=0.6, validation=0.5)


def test_tiny_groups_keep_at_least_one_training_example():
    pool = [Example("only one", "x"), Example("two a", "y"), Example("two b", "y")] + [
        Example(f"z {i}", "z") for i in range(3)]
    splits = split_examples(pool, test=0.1, validation=0.1, seed=0)
    train = Counter(e.output for e in splits["train"])
    assert train["x"] == 1 and train["y"] == 1 and train["z"] == 1
    assert Counter(e.output for e in splits["test"]) == {"y": 1, "z": 1}
