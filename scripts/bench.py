#!/usr/bin/env python3
"""CoS benchmark suite; see ``vllm_cos/bench/`` (``python scripts/bench.py --quick --models DIR``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_cos.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
