#!/usr/bin/env python
"""Check vllm-cos's vLLM hook surface against a vLLM source tree (parsed, never imported).

    python scripts/check_hooks.py VLLM_SOURCE_DIR [-q]

VLLM_SOURCE_DIR holds the ``vllm`` package (an unpacked wheel, a site-packages directory, a
checkout).  Prints present / MISSING / CHANGED per name of
:data:`vllm_cos.adapters.surface.SURFACE`, then a summary line; exit 1 if anything is missing
or changed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vllm_cos.adapters.surface_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
