"""vLLM general-plugin entry point (``vllm.general_plugins: cos``).

vLLM calls :func:`register` in every process it starts (API server, engine core,
workers).  It checks the installed vLLM against the version our hooks were written
for, then installs each hook listed in :mod:`vllm_cos.adapters`.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.cos")  # under vLLM's configured "vllm" logger

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm_cos import adapters

    adapters.check_vllm_version()
    adapters.install_all()
    _registered = True
