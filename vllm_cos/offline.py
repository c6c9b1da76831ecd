"""Helpers for an offline ``vllm.LLM`` running a CoS configuration.

Layering: :mod:`vllm_cos.engine` (engine set-up, no vLLM imports) -> :mod:`vllm_cos.adapters`
(vLLM hooks) -> this module (what a user script calls on a live engine).

* :func:`cos_stats` asks every worker for its CoS counters through ``LLM.collective_rpc`` by
  method name (the worker extension :class:`vllm_cos.adapters.worker_ext.CoSWorkerExtension`
  that the CoS engine set-up installs), so it works under vLLM's default multiprocessing
  without ``VLLM_ALLOW_INSECURE_SERIALIZATION``.
* :func:`shutdown_llm` stops an engine now instead of at interpreter exit.
"""

from __future__ import annotations

import gc
import logging

from vllm_cos.engine import WORKER_EXTENSION_METHOD

logger = logging.getLogger("vllm.cos")  # under vLLM's configured "vllm" logger


def cos_stats(llm) -> list[dict | None]:
    """CoS counters per worker of an offline ``vllm.LLM`` (naive / alternate schedules; None
    for ``standard`` and for tensor-parallel ranks but the first, which count the same tokens): steps (= served-model forwards), draft_forwards (draft group), drafts
    proposed/accepted, bonus proposed/accepted, tokens emitted, row_steps (verification rounds
    = request-steps), acceptance rate, mean tokens per step, mean accepted length.

    The same counters are Prometheus metrics ``vllm_cos_*`` (``/metrics`` of ``vllm serve``)
    and a "CoS metrics" log line; see :mod:`vllm_cos.adapters.metrics`."""
    return llm.collective_rpc(WORKER_EXTENSION_METHOD)


def shutdown_llm(llm) -> None:
    """Stop an offline ``vllm.LLM``'s engine core now (its memory is free once unreferenced)."""
    if llm is None:
        return
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as exc:  # already stopped, or a half-built engine
        logger.debug("cos: engine shutdown: %s", exc)
    gc.collect()
