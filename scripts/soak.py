"""Reliability soak of ``vllm-cos serve`` on loopback (see ``vllm_cos/soak/runner.py``).

    .venv/bin/python scripts/soak.py                       # WE then CD: 1000 requests at concurrency 64, 200 bad
    .venv/bin/python scripts/soak.py --rules we -n 120 -c 16 --bad 40 --kv-blocks 24
"""

import sys

from vllm_cos.soak.runner import main

if __name__ == "__main__":
    sys.exit(main())
