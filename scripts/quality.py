#!/usr/bin/env python3
"""Quality benchmark (``vllm_cos/quality/``): ``python scripts/quality.py --models ../shared/models --out DIR``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_cos.quality import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
