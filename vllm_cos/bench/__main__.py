"""``python -m vllm_cos.bench``."""

import sys

from vllm_cos.bench.suite import main

sys.exit(main())
