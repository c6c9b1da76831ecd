"""The start-up line on the KV split between collaborators (all layers share one block table)."""

from __future__ import annotations

import logging

from vllm_cos.engine import kv_share_line

logger = logging.getLogger("vllm.cos")  # under vLLM's configured "vllm" logger


def log_kv_share(core, kv_cache_config) -> None:
    """One start-up line: how many tokens of KV fit, for every collaborator alike.

    Served and draft-group layers share one block table (vLLM sums every layer's page size
    per block), so a block holds a slot of every model: the token capacity is the same for
    all of them and each model's share of the memory is its KV bytes per token.
    """
    from vllm_cos.adapters.member_stack import member_attr

    names = core.cfg.model_names
    markers = {member_attr(i): name for i, name in enumerate(names)}
    bytes_per_token: dict[str, int] = {name: 0 for name in names}
    block_size = None
    for group in kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        block_size = block_size or spec.block_size
        per_layer = getattr(spec, "kv_cache_specs", None)
        for layer in group.layer_names:
            layer_spec = per_layer[layer] if per_layer else spec
            owner = next((n for marker, n in markers.items() if marker in layer), core.cfg.target)
            bytes_per_token[owner] += layer_spec.page_size_bytes // layer_spec.block_size
    logger.info("%s", kv_share_line(bytes_per_token, block_size or 0, kv_cache_config.num_blocks,
                                    len(kv_cache_config.kv_cache_groups)))
