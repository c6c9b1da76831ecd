"""Bad-configuration fuzz of CoS start-up (see ``vllm_cos/soak/config_runner.py``).

    .venv/bin/python scripts/fuzz_configs.py                    # 200 seeded cases, 12 server starts
    .venv/bin/python scripts/fuzz_configs.py -n 400 --starts 0  # the check tier only
"""

import sys

from vllm_cos.soak.config_runner import main

if __name__ == "__main__":
    sys.exit(main())
