"""The workspace: init, finding it upward, config errors that name the key."""

import pytest

from tunelab.errors import UserError
from tunelab.workspace import Workspace


def test_init_makes_the_layout_and_find_walks_upward(tmp_path):
    ws = Workspace.init(tmp_path / "proj")
    for sub in ("prompts", "data", ".tunelab"):
        assert (ws.root / sub).is_dir()
    assert (ws.root / ".tunelab" / "tunelab.db").is_file()
    deep = ws.root / "a" / "b"
    deep.mkdir(parents=True)
    assert Workspace.find(deep).root == ws.root


def test_outside_a_workspace_is_a_friendly_error(tmp_path, cli, monkeypatch):
    monkeypatch.delenv("TUNELAB_WORKSPACE", raising=False)
    with pytest.raises(UserError, match="tunelab init"):
        Workspace.find(tmp_path)


def test_unknown_config_key_is_named(tmp_path):
    ws = Workspace.init(tmp_path / "proj")
    (ws.root / "tunelab.yaml").write_text("default_modle: x\n")
    with pytest.raises(UserError, match="unknown key 'default_modle'"):
        Workspace(ws.root)


def test_init_command(tmp_path, cli):
    result = cli("init", tmp_path / "w2")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "w2" / "tunelab.yaml").is_file()
    again = cli("init", tmp_path / "w2")  # keeps what is there
    assert again.exit_code == 0


def test_a_named_model_passes_its_settings_and_the_workspace_to_its_backend(tmp_path, monkeypatch):
    import tunelab.models as models

    seen = {}

    class Recorder:
        def __init__(self, name, path=None, lora=None, threads=None, n_ctx=None, workspace=None, **_):
            seen.update(name=name, path=path, lora=lora, threads=threads, n_ctx=n_ctx, workspace=workspace)

    monkeypatch.setattr(models, "backend_class", lambda backend: Recorder)
    ws = Workspace.init(tmp_path / "proj")
    (ws.root / "tunelab.yaml").write_text("models:\n  small:\n    backend: llamacpp\n    path: m.gguf\n"
                                          "    lora: a.gguf\n    threads: 1\n    n_ctx: 2048\n")
    ws = Workspace(ws.root)
    models.load_model("small", ws, cached=False)
    assert seen == {"name": "small", "path": "m.gguf", "lora": "a.gguf", "threads": 1, "n_ctx": 2048, "workspace": ws}
    (ws.root / "tunelab.yaml").write_text("models:\n  small:\n    backend: llamacpp\n    n_ctx: 10\n")
    with pytest.raises(UserError, match="n_ctx"):
        Workspace(ws.root)
