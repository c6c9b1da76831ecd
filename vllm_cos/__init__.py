"""vllm-cos: collaborative decoding via speculation (CoS) for vLLM.

Layers (imports point down only):
  config      - typed configuration loaded from YAML
  combine     - combination rules r = C(p_1..p_n)          (pure torch)
  sampling    - temperature / top-k / top-p applied to r    (pure torch)
  verify      - batched speculative verification against r  (pure torch)
  ledger      - pending-token ledger and schedules          (pure torch)
  reference   - plain PyTorch/transformers oracle
  engine      - ``--speculative-config cos.yaml`` -> stock engine arguments (no vLLM imports)
  adapters/   - vLLM hooks (the only place that imports vLLM internals)
  offline, cli - helpers on a live ``vllm.LLM`` (``cos_stats``) and the ``vllm-cos`` command

``vllm_cos.cos_stats`` is :func:`vllm_cos.offline.cos_stats` (imported on first use).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("cos_stats", "shutdown_llm"):
        from vllm_cos import offline

        return getattr(offline, name)
    raise AttributeError(f"module 'vllm_cos' has no attribute {name!r}")
