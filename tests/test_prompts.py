"""Prompts: parsing, sandboxed rendering, requests, and versions (library level)."""

from __future__ import annotations

import pytest

from tunelab.datasets import Example, save_dataset
from tunelab.errors import NotFound, UserError
from tunelab.prompts import (
    DemoSource,
    commit_prompt,
    current_version,
    diff_prompts,
    list_prompts,
    load_prompt,
    parse_prompt,
    prompt_log,
    prompt_path,
    rollback_prompt,
    show_prompt,
    tag_prompt,
)

SMS = """---
description: spam or ham
output: {type: label, labels: [spam, ham]}
demos:
  - {input: "WIN a free prize now", output: spam}
  - {input: "see you at 5", output: ham}
---
system:
Classify the message as one of: {{ labels | join(", ") }}.

user:
Message: {{ input }}
"""


def parse(text: str, name: str = "t"):
    return parse_prompt(text, name, path=f"prompts/{name}.prompt")


def error_of(text: str) -> UserError:
    with pytest.raises(UserError) as info:
        p = parse(text)
        p.render(Example("some input", "gold"))
    return info.value


# -- parsing and front matter ------------------------------------------------------------------
def test_front_matter_and_defaults():
    p = parse(SMS)
    assert p.output.type == "label" and p.labels == ["spam", "ham"]
    assert p.max_tokens == 16 and p.temperature == 0.0
    assert p.description == "spam or ham"
    assert p.model == "smollm2-135m"  # no workspace, no model: the bundled default
    assert [ex.output for ex in p.demos] == ["spam", "ham"]
    assert p.instruction == 'Classify the message as one of: {{ labels | join(", ") }}.'
    text = parse("---\noutput: text\n---\n{{ input }}\n")
    assert text.output.type == "text" and text.max_tokens == 256
    js = parse("---\nmax_tokens: 40\noutput: {type: json, schema: {type: object, required: [a]}}\n---\n{{ input }}")
    assert js.output.schema == {"type": "object", "required": ["a"]} and js.max_tokens == 40


def test_body_without_markers_is_one_user_part_and_no_front_matter_is_allowed():
    p = parse_prompt("Translate: {{ input }}\n", "plain")
    assert p.render("hello") == [{"role": "user", "content": "Translate: hello"}]
    assert p.instruction == "Translate: {{ input }}"


def test_workspace_default_model(workspace):
    prompt_path(workspace, "m").write_text("---\n---\n{{ input }}\n")
    assert load_prompt(workspace, "m").model == workspace.config.default_model
    prompt_path(workspace, "m").write_text("---\nmodel: fake\n---\n{{ input }}\n")
    assert load_prompt(workspace, "m").model == "fake"


# -- rendering ---------------------------------------------------------------------------------
def test_demos_render_as_turns_between_system_and_final_user():
    msgs = parse(SMS).render(Example("hello there", "ham"))
    assert msgs == [
        {"role": "system", "content": "Classify the message as one of: spam, ham."},
        {"role": "user", "content": "Message: WIN a free prize now"},
        {"role": "assistant", "content": "spam"},
        {"role": "user", "content": "Message: see you at 5"},
        {"role": "assistant", "content": "ham"},
        {"role": "user", "content": "Message: hello there"},
    ]


def test_explicit_demos_override_and_empty_means_zero_shot():
    p = parse(SMS)
    assert [m["role"] for m in p.render("x", demos=[])] == ["system", "user"]
    msgs = p.render("x", demos=[Example("free cash", "spam")])
    assert msgs[1:3] == [{"role": "user", "content": "Message: free cash"}, {"role": "assistant", "content": "spam"}]


def test_inline_demos_when_template_uses_them():
    p = parse("""---
output: {type: label, labels: [pos, neg]}
demos: [{input: great, output: pos}, {input: awful, output: neg}]
---
user:
{% for d in demos %}
Text: {{ d.input }} -> {{ d.output }}
{% endfor %}
Text: {{ input }} ->
""")
    msgs = p.render("fine")
    assert len(msgs) == 1
    assert msgs[0]["content"] == "Text: great -> pos\nText: awful -> neg\nText: fine ->"


def test_extra_fields_are_variables_and_gold_output_is_hidden():
    p = parse("---\n---\nsystem:\nContext: {{ context }}\nuser:\n{{ input }}\n")
    msgs = p.render(Example("q?", "gold answer", meta={"context": "the sky is blue"}))
    assert msgs[0]["content"] == "Context: the sky is blue"
    leak = parse("---\n---\n{{ input }} {{ output }}\n")
    with pytest.raises(UserError, match="undefined variable: 'output'"):
        leak.render(Example("q", "gold"))


def test_json_schema_variable_and_request():
    p = parse("---\noutput: {type: json, schema: {type: object, properties: {name: {type: string}}}}\n---\n"
              "system:\nAnswer with JSON matching:\n{{ schema }}\nuser:\n{{ input }}\n")
    req = p.request("Ada Lovelace")
    assert '"name"' in req.messages[0]["content"]
    assert req.json_schema == {"type": "object", "properties": {"name": {"type": "string"}}}
    assert req.labels is None and req.max_tokens == 256


def test_request_sets_labels_limits_and_overrides():
    req = parse(SMS).request(Example("free money", "spam"), demos=[], seed=3, free_text=True)
    assert req.labels == ["spam", "ham"] and req.max_tokens == 16 and req.temperature == 0.0
    assert req.seed == 3 and req.free_text is True
    assert req.messages[-1] == {"role": "user", "content": "Message: free money"}


def test_request_runs_on_the_fake_model():
    from tunelab.models.fake import FakeModel

    (comp,) = FakeModel().complete([parse(SMS).request("this is spam, clearly")])
    assert comp.text == "spam" and set(comp.label_logprobs) == {"spam", "ham"}


def test_strict_undefined_names_variable_and_line():
    err = error_of("---\ntemperature: 0\n---\nsystem:\nhello\nuser:\n{{ input }} {{ inptu }}\n")
    assert "inptu" in str(err) and err.line == 7 and "prompts/t.prompt" in str(err)


# -- malformed prompts -------------------------------------------------------------------------
@pytest.mark.parametrize("text, line, words", [
    ("---\nmodel: [a, b\ntemperature: 0\n---\n{{ input }}\n", None, ["YAML error"]),
    ("---\ntemprature: 0.5\n---\n{{ input }}\n", 2, ["unknown key 'temprature'", "temperature"]),
    ("---\noutput:\n  type: label\n  lables: [a, b]\n---\n{{ input }}\n", 4, ["unknown key 'output.lables'"]),
    ("---\noutput: {type: label}\n---\n{{ input }}\n", 2, ["labels"]),
    ("---\noutput: {type: label, labels: [a, a]}\n---\n{{ input }}\n", 2, ["duplicate labels: a"]),
    ("---\noutput: {type: json, schema: {type: 12}}\n---\n{{ input }}\n", 2, ["invalid JSON schema"]),
    ("---\ntemperature: hot\n---\n{{ input }}\n", 2, ["temperature"]),
    ("---\ndemos:\n  - {input: a, output: b}\n  - {input: c}\n---\n{{ input }}\n", 4, ["demos.1.output"]),
    ("---\ndemos: {dataset: d, kk: 2}\n---\n{{ input }}\n", 2, ["unknown key 'demos.kk'"]),
    ("---\nmodel: x\n{{ input }}\n", 1, ["not closed"]),
    ("---\n- a\n- b\n---\n{{ input }}\n", 2, ["mapping"]),
    ("---\nmodel: x\n---\nsystem:\nhi\nuser:\n{{ input }\n", 7, ["syntax error"]),
    ("---\n---\nuser:\n{% if input %}\n{{ input }}\n", None, ["syntax error"]),
    ("---\n---\nsystem:\nonly a system part\n", None, ["no user part"]),
    ("---\n---\nsystem:\nuser:\n{{ input }}\n", 3, ["system part is empty"]),
    ("---\nmodel: x\n---\n\n", None, ["no body"]),
])
def test_malformed_prompts_name_file_line_and_field(text, line, words):
    err = error_of(text)
    msg = str(err)
    assert msg.startswith("prompts/t.prompt")
    if line is not None:
        assert err.line == line, msg
    for word in words:
        assert word in msg


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ input['__class__'] }}",
    "{{ input|attr('__class__') }}",
    "{{ input|attr('__cl' ~ 'ass__') }}",
    "{{ '{0.__class__}'.format(input) }}",
    "{{ lipsum.__globals__['os'] }}",
    "{% set x = [] %}{{ x.append(1) }}",
    "{{ 'ab' * 100000000 }}",
])
def test_sandbox_escapes_are_rejected(template):
    err = error_of("---\n---\nsystem:\nbe nice\nuser:\n" + template + "\n")
    assert "unsafe template" in str(err) or "template error" in str(err), str(err)
    assert err.line == 6


# -- replace, round trip, versions ----------------------------------------------------------------
def test_content_hash_is_stable_and_ignores_formatting():
    p = parse(SMS)
    assert parse(SMS).version == p.version and len(p.version) == 12
    reformatted = SMS.replace("description: spam or ham", "# a comment\ndescription: 'spam or ham'\ntemperature: 0")
    assert parse(reformatted).version == p.version
    assert parse(SMS.replace("Message:", "Msg:")).version != p.version


def test_replace_and_to_text_round_trip():
    p = parse(SMS)
    q = p.replace(instruction="Say spam or ham.", temperature=0.7, demos=[Example("hi mum", "ham", {"x": 1})])
    assert q.instruction == "Say spam or ham." and q.temperature == 0.7
    assert [(d.input, d.output, d.meta) for d in q.demos] == [("hi mum", "ham", {"x": 1})]
    again = parse_prompt(q.to_text(), "t")
    assert again.version == q.version and again.render("z") == q.render("z")
    assert p.replace().version == p.version
    zero = p.replace(demos=None)
    assert zero.demos == [] and len(zero.render("z")) == 2
    no_system = parse_prompt("Say: {{ input }}", "n").replace(instruction="Be brief.")
    assert no_system.render("x") == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say: x"}]
    with pytest.raises(UserError, match="unknown prompt field 'temp'"):
        p.replace(temp=1)


def test_draw_demos_random_and_stratified():
    """One meaning of "stratified" for prompt files and the optimizer: labels in turn, a round each."""
    from tunelab.demos import DemoSpec, draw

    exs = [Example(f"a{i}", "a") for i in range(10)] + [Example(f"b{i}", "b") for i in range(2)]
    strat = draw(exs, 4, "stratified", seed=1)
    assert sorted(e.output for e in strat) == ["a", "a", "b", "b"]
    assert {e.output for e in strat[:2]} == {"a", "b"}  # round one holds every label
    assert strat == DemoSpec("stratified", per_label=2).draw(exs, seed=1)  # the optimizer's spec: the same draw
    assert draw(exs, 4, "random", seed=1) == draw(exs, 4, "random", seed=1)
    assert len(draw(exs, 50, "random")) == 12


def test_demos_drawn_from_a_dataset(workspace):
    train = [Example(f"spam {i}", "spam") for i in range(5)] + [Example(f"ham {i}", "ham") for i in range(5)]
    save_dataset(workspace, "sms", {"train": train, "test": [Example("t", "ham")]})
    prompt_path(workspace, "d").write_text(
        "---\noutput: {type: label, labels: [spam, ham]}\n"
        "demos: {dataset: sms, k: 2, strategy: stratified, seed: 3}\n---\n{{ input }}\n")
    p = load_prompt(workspace, "d")
    assert isinstance(p.demos, DemoSource)
    demos = p.resolve_demos()
    assert sorted(d.output for d in demos) == ["ham", "spam"]
    msgs = p.render("new one")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert {msgs[1]["content"], msgs[3]["content"]} == {"spam", "ham"}
    detached = parse_prompt(p.to_text(), "d")
    with pytest.raises(UserError, match="draws its demos from dataset 'sms'"):
        detached.render("x")


def write(ws, name, text):
    prompt_path(ws, name).write_text(text, encoding="utf-8")


def test_commit_log_tag_show_diff_rollback(workspace):
    write(workspace, "sms", SMS)
    v1 = commit_prompt(workspace, "sms", "first version", author="ada")
    assert v1 == load_prompt(workspace, "sms").version == current_version(workspace, "sms")
    with pytest.raises(UserError, match="nothing to commit"):
        commit_prompt(workspace, "sms", "again")
    write(workspace, "sms", SMS.replace("Message:", "SMS:"))
    v2 = commit_prompt(workspace, "sms", "shorter label", meta={"by": "test"})
    assert v2 != v1
    log = prompt_log(workspace, "sms")
    assert [(c.version, c.parent, c.message) for c in log] == [(v2, v1, "shorter label"), (v1, None, "first version")]
    assert log[1].author == "ada" and log[0].meta == {"by": "test"} and log[0].author

    assert tag_prompt(workspace, f"sms@{v1[:6]}", "production") == v1
    assert load_prompt(workspace, "sms@production").version == v1
    assert "Message: {{ input }}" in show_prompt(workspace, "sms@production")
    assert load_prompt(workspace, "sms@current").version == v2
    assert prompt_log(workspace, "sms")[1].labels == ["production"]

    diff = diff_prompts(workspace, "sms@production", "sms@current")
    assert "-Message: {{ input }}" in diff and "+SMS: {{ input }}" in diff
    assert diff_prompts(workspace, "sms") == ""  # working file == current
    write(workspace, "sms", SMS.replace("Message:", "Text:"))
    assert "+Text: {{ input }}" in diff_prompts(workspace, "sms")

    with pytest.raises(UserError, match="uncommitted changes"):
        rollback_prompt(workspace, "sms", "production")
    assert rollback_prompt(workspace, "sms", "production", force=True) == v1
    assert load_prompt(workspace, "sms").version == v1 == current_version(workspace, "sms")
    top = prompt_log(workspace, "sms")[0]
    assert (top.version, top.parent, top.message) == (v1, v2, f"rollback to {v1}")
    (summary,) = list_prompts(workspace)
    assert summary.status == "clean" and summary.commits == 3 and summary.labels == {"production": v1}


def test_commit_with_text_writes_clean_file_and_keeps_edits(workspace):
    write(workspace, "sms", SMS)
    commit_prompt(workspace, "sms", "v1")
    new = parse(SMS).replace(instruction="Only spam or ham.")
    v2 = commit_prompt(workspace, "sms", "optimized", text=new.to_text(), meta={"optimizer": "x"})
    assert load_prompt(workspace, "sms").version == v2  # clean file follows the new version
    write(workspace, "sms", SMS.replace("Message", "Edited"))
    v3 = commit_prompt(workspace, "sms", "again", text=parse(SMS).replace(temperature=0.5).to_text())
    assert current_version(workspace, "sms") == v3
    assert "Edited" in prompt_path(workspace, "sms").read_text()  # the user's edits are kept


def test_refs_errors(workspace):
    write(workspace, "sms", SMS)
    with pytest.raises(NotFound, match="no committed versions"):
        load_prompt(workspace, "sms@abcd")
    commit_prompt(workspace, "sms", "v1")
    with pytest.raises(NotFound, match="no version or label 'staging'"):
        load_prompt(workspace, "sms@staging")
    with pytest.raises(NotFound, match="unknown prompt 'nope'"):
        load_prompt(workspace, "nope")
    with pytest.raises(UserError, match="reserved"):
        tag_prompt(workspace, "sms@current", "current")
    # a committed prompt whose file is gone still loads (its current version)
    v = current_version(workspace, "sms")
    prompt_path(workspace, "sms").unlink()
    assert load_prompt(workspace, "sms").version == v


def test_demo_missing_a_field_is_named():
    p = parse("---\ndemos: [{input: a, output: b}]\n---\nsystem:\nx\nuser:\n{{ context }}: {{ input }}\n")
    with pytest.raises(UserError, match="undefined variable: 'context'.*few-shot demo 1") as info:
        p.render(Example("q", "", {"context": "c"}))
    assert info.value.line == 7
