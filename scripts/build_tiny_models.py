#!/usr/bin/env python3
"""Build the tiny shared-tokenizer Llama models used by tests and the demo (no downloads).

Thin CLI over :mod:`vllm_cos.tiny_models`:

    .venv/bin/python scripts/build_tiny_models.py --out models/tiny [--force] [--measure]

Cached: does nothing if ``--out`` already holds complete models built from the same recipe.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from vllm_cos.tiny_models import main
except ImportError:  # run from a checkout without the editable install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vllm_cos.tiny_models import main

if __name__ == "__main__":
    raise SystemExit(main())
