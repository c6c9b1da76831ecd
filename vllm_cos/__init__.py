"""vllm-cos: collaborative decoding via speculation (CoS) for vLLM.

Layers (imports point down only):
  config      - typed configuration loaded from YAML
  combine     - combination rules r = C(p_1..p_n)          (pure torch)
  sampling    - temperature / top-k / top-p applied to r    (pure torch)
  verify      - batched speculative verification against r  (pure torch)
  ledger      - pending-token ledger and schedules          (pure torch)
  reference   - plain PyTorch/transformers oracle
  adapters/   - vLLM hooks (the only place that imports vLLM internals)
"""

__version__ = "0.1.0"
