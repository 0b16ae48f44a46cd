"""The workspace: a folder with `tunelab.yaml`, `prompts/`, `data/` and `.tunelab/`.

Every command finds its workspace upward from the current directory (or from `--workspace`,
or `TUNELAB_WORKSPACE`). `.tunelab/` holds the database and the artifacts (dataset files,
adapters, reports, the response cache).
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunelab.errors import UserError, pydantic_message
from tunelab.files import load_yaml, read_text
from tunelab.store import Store

CONFIG_NAME = "tunelab.yaml"
DEFAULT_MODEL = "smollm2-135m"


class Pricing(BaseModel):
    """What a model costs: per token for API models, per hour of the machine for local ones."""

    model_config = ConfigDict(extra="forbid")
    input_per_million: float = Field(0.0, ge=0, description="$ per million prompt tokens (API models)")
    output_per_million: float = Field(0.0, ge=0, description="$ per million completion tokens (API models)")
    per_hour: float = Field(0.0, ge=0, description="$ per hour of the machine (local models)")


class ModelConfig(BaseModel):
    """A named model in `tunelab.yaml`: a backend plus its settings."""

    model_config = ConfigDict(extra="forbid")
    backend: str = Field(description="backend name: local, openai, fake, or a plugin's")
    path: str | None = Field(None, description="local: a Hugging Face model folder; llamacpp: a .gguf file or a Hugging Face folder (converted once)")
    base_url: str | None = Field(None, description="openai: the server's base URL, e.g. http://127.0.0.1:8080/v1")
    model: str | None = Field(None, description="openai: the model name the server knows")
    api_key_env: str | None = Field(None, description="openai: the environment variable holding the API key")
    precision: Literal["auto", "bf16", "fp32"] | None = None
    concurrency: int | None = Field(None, ge=1)
    timeout_s: float | None = Field(None, gt=0)
    threads: int | None = Field(None, ge=1, description="local, llamacpp: CPU threads (default: the backend's)")
    lora: str | None = Field(None, description="llamacpp: a LoRA adapter GGUF loaded over the model (tunelab export --format gguf-lora)")
    n_ctx: int | None = Field(None, ge=256, description="llamacpp: the context window in tokens (default 4096)")
    pricing: Pricing | None = None


class JudgeConfig(BaseModel):
    """`judge:` in tunelab.yaml: the LLM-as-judge of `--metric judge` and `tunelab eval judge`."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="the judge model (a model spec or a name under models:)")
    rubric: str | None = Field(None, description="what a good answer is; the judge grades against it")
    scale: tuple[int, int] = Field((1, 5), description="lowest and highest grade, e.g. [1, 5]")


class WorkspaceConfig(BaseModel):
    """`tunelab.yaml`. Unknown keys are errors, so a typo is never silently ignored."""

    model_config = ConfigDict(extra="forbid")
    name: str = "tunelab"
    default_model: str = DEFAULT_MODEL
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    pricing: dict[str, Pricing] = Field(
        default_factory=lambda: {"local": Pricing(per_hour=0.10)},
        description="pricing by model name or backend; 'local' is the default for local models",
    )
    engineer_hourly_rate: float = Field(0.0, ge=0, description="$ per engineer hour, for setup cost")
    author: str | None = None
    judge: JudgeConfig | None = Field(None, description="the LLM-as-judge: model, rubric, scale")


DEFAULT_CONFIG_TEXT = f"""\
# tunelab workspace: https://github.com/tunelab (see README)
name: {{name}}
default_model: {DEFAULT_MODEL}

# Named models. The bundled local model needs no entry.
# models:
#   big:
#     backend: openai
#     base_url: http://127.0.0.1:8000/v1
#     model: my-served-model
#     api_key_env: OPENAI_API_KEY
#     pricing: {{{{input_per_million: 0.15, output_per_million: 0.60}}}}

# What a request costs. 'local' is $ per hour of this machine.
pricing:
  local:
    per_hour: 0.10

# engineer_hourly_rate: 80   # counts engineer time in the setup cost of a comparison
"""


class Workspace:
    """A tunelab workspace rooted at `root`."""

    def __init__(self, root: Path, config: WorkspaceConfig | None = None):
        self.root = Path(root).resolve()
        self.config = config if config is not None else load_config(self.root / CONFIG_NAME)

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    # -- places -----------------------------------------------------------------------------
    @property
    def prompts_dir(self) -> Path:
        return self.root / "prompts"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def state_dir(self) -> Path:
        return self.root / ".tunelab"

    @property
    def artifacts_dir(self) -> Path:
        path = self.state_dir / "artifacts"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def artifact_path(self, *parts: str) -> Path:
        path = self.artifacts_dir.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def database_url(self) -> str:
        url = os.environ.get("TUNELAB_DATABASE_URL")
        if url:
            return url
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.state_dir / 'tunelab.db'}"

    @cached_property
    def store(self):
        """The workspace's Store, migrated to the newest schema on first use."""
        return Store(self.database_url)

    def pricing_for(self, model_name: str, backend: str) -> "Pricing":
        """The pricing of a model: by its name, else by its backend, else free."""
        cfg = self.config
        if model_name in cfg.models and cfg.models[model_name].pricing is not None:
            return cfg.models[model_name].pricing
        for key in (model_name, backend):
            if key in cfg.pricing:
                return cfg.pricing[key]
        return Pricing()

    # -- finding and making ------------------------------------------------------------------
    @classmethod
    def find(cls, start: str | Path | None = None) -> "Workspace":
        """The workspace holding `start` (default: `TUNELAB_WORKSPACE`, else the cwd), found upward."""
        if start is None:
            start = os.environ.get("TUNELAB_WORKSPACE") or Path.cwd()
        here = Path(start).resolve()
        for folder in (here, *here.parents):
            if (folder / CONFIG_NAME).is_file():
                return cls(folder)
        raise UserError(
            f"no tunelab workspace here ({here} or any folder above it has no {CONFIG_NAME}); "
            "run 'tunelab init' first, or pass --workspace DIR"
        )

    @classmethod
    def init(cls, root: str | Path, name: str | None = None) -> "Workspace":
        """Make (or keep) a workspace at `root`; never overwrites an existing `tunelab.yaml`."""
        root = Path(root).resolve()
        if root.exists() and not root.is_dir():
            raise UserError("is a file, not a folder", path=root)
        root.mkdir(parents=True, exist_ok=True)
        config_path = root / CONFIG_NAME
        if not config_path.exists():
            config_path.write_text(DEFAULT_CONFIG_TEXT.format(name=name or root.name), encoding="utf-8")
        for sub in ("prompts", "data", ".tunelab"):
            (root / sub).mkdir(exist_ok=True)
        gitignore = root / ".gitignore"
        if not gitignore.exists():
            gitignore.write_text(".tunelab/\n", encoding="utf-8")
        ws = cls(root)
        ws.store  # create and migrate the database now
        return ws


def load_config(path: Path) -> WorkspaceConfig:
    """Read and validate `tunelab.yaml`; errors name the file and the field."""
    data = load_yaml(read_text(path), path) or {}
    if not isinstance(data, dict):
        raise UserError("expected a mapping of settings at the top level", path=path)
    try:
        return WorkspaceConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(pydantic_message(exc, WorkspaceConfig), path=path) from None
