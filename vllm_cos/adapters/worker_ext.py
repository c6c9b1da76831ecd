"""Hook: a vLLM worker extension that answers ``collective_rpc("cos_stats")``.

vLLM internals touched: ``ParallelConfig.worker_extension_cls`` (set through the engine
argument ``worker_extension_cls`` by :mod:`vllm_cos.adapters.engine_args`); vLLM adds the
class named there to the worker's bases, so its methods run inside the worker and can be
called by name through ``LLM.collective_rpc`` -- a string crosses process boundaries under
vLLM's default multiprocessing, a function would need insecure serialization.

A user who needs an extension of their own subclasses :class:`CoSWorkerExtension` and passes
that class; any other ``worker_extension_cls`` is refused at start-up.
"""

from __future__ import annotations


class CoSWorkerExtension:
    """Methods added to every vLLM worker of a CoS engine."""

    def cos_stats(self) -> dict | None:
        """This worker's CoS counters (see :func:`vllm_cos.offline.cos_stats`)."""
        from vllm_cos.adapters.spec_decode import worker_stats

        return worker_stats(self)


def install() -> None:
    """Nothing to patch: the class is named in the engine arguments."""
