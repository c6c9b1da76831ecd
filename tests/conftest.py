"""Shared pytest fixtures.

``tiny_models``: the three tiny shared-tokenizer Llama checkpoints ({"large", "medium",
"small"} -> model dir), built once (cached on disk) by :func:`vllm_cos.tiny_models.build_tiny_models`
into ``models/tiny`` at the repo root, or into ``$VLLM_COS_MODELS_DIR`` when that is set.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_models_dir() -> Path:
    env = os.environ.get("VLLM_COS_MODELS_DIR")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "models" / "tiny"


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    from vllm_cos.tiny_models import build_tiny_models

    return build_tiny_models(tiny_models_dir())
