"""Hook: the ``standard`` schedule as a model architecture whose logits are log r.

Standard collaborative decoding runs every collaborator on every token and samples from
r = C(p_1, ..., p_n).  In vLLM that is one model: :class:`CoSStandardForCausalLM` holds
every collaborator as a submodule (each built by vLLM's own model class, each with its own
attention layers, so every collaborator's KV lives in vLLM's paged cache and vLLM's memory
profiling sees all weights), runs all of them on the same tokens, and its
``compute_logits`` returns log r.  The stock sampler then applies the request's
temperature / top-k / top-p / seed to r, reports logprobs of r, and everything else
(stop strings, n > 1, continuous batching, prefix caching, chunked prefill) is stock.

It is selected by ``hf_overrides={"architectures": ["CoSStandardForCausalLM"]}`` (set by
:mod:`vllm_cos.adapters.engine_args`); the CoS config comes from
``vllm_config.additional_config["cos"]``.

vLLM internals touched: ``ModelRegistry.register_model``; ``ModelConfig`` (one per
collaborator); ``vllm.config.utils.replace``; ``ModelRegistry.resolve_model_cls``;
``DefaultModelLoader.Source`` through the model attribute ``secondary_weights`` (the loader
reads the other collaborators' checkpoints); each member's ``forward`` / ``compute_logits``
/ ``load_weights``.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.nn as nn

from vllm_cos.engine import STANDARD_ARCH, config_from_additional

logger = logging.getLogger("vllm_cos")

_OTHER_PREFIX = "cos_weights_{index}."


def member_attr(index: int) -> str:
    """Submodule name of a member; no digits (vLLM reads the layer index from the name)."""
    return "cos_member_" + "abcdefghijklmnopqrstuvwxyz"[index]


def member_model_config(vllm_config, path: str):
    """A vLLM ModelConfig for one collaborator, matching the served model's settings."""
    from vllm.config import ModelConfig

    base = vllm_config.model_config
    return ModelConfig(
        model=path,
        tokenizer=base.tokenizer,
        tokenizer_mode=base.tokenizer_mode,
        trust_remote_code=base.trust_remote_code,
        dtype=base.dtype,
        seed=base.seed,
        max_model_len=base.max_model_len,
        enforce_eager=base.enforce_eager,
        max_logprobs=base.max_logprobs,
    )


def build_member(vllm_config, model_config, prefix: str) -> nn.Module:
    from vllm.config.utils import replace
    from vllm.model_executor.models.registry import ModelRegistry

    member_class, _ = ModelRegistry.resolve_model_cls(model_config.architectures, model_config=model_config)
    return member_class(vllm_config=replace(vllm_config, model_config=model_config), prefix=prefix)


def to_vocab(logits: torch.Tensor, tokenizer_size: int) -> torch.Tensor:
    """Crop a member's logits to the shared tokenizer (embedding padding is masked)."""
    return logits[..., :tokenizer_size].float()


def pad_vocab(logits: torch.Tensor, width: int) -> torch.Tensor:
    if logits.shape[-1] >= width:
        return logits
    pad = logits.new_full((*logits.shape[:-1], width - logits.shape[-1]), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


class CoSStandardForCausalLM(nn.Module):
    """All collaborators in one module; logits = log r (up to a constant per row)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__()
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

        from vllm_cos.combine import build_combiner

        carried = config_from_additional(vllm_config.additional_config)
        if carried is None:
            raise RuntimeError(f"cos: {STANDARD_ARCH} needs additional_config['cos'] "
                               "(start it with --speculative-config cos.yaml)")
        self.cos_config, self.tokenizer_size = carried
        cfg = self.cos_config
        self.target_index = cfg.index(cfg.target)
        self.vocab_width = vllm_config.model_config.get_vocab_size()
        members = []
        self.secondary_weights = []
        for i, spec in enumerate(cfg.models):
            if i == self.target_index:
                model_config = member_model_config(vllm_config, spec.path)
            else:
                model_config = member_model_config(vllm_config, spec.path)
                self.secondary_weights.append(DefaultModelLoader.Source(
                    spec.path, None, prefix=_OTHER_PREFIX.format(index=i)))
            name = member_attr(i)
            members.append(build_member(vllm_config, model_config, prefix=f"{prefix}.{name}".lstrip(".")))
            if spec.dtype not in ("auto", str(model_config.dtype).replace("torch.", "")):
                logger.warning("cos: model %r runs in %s inside vLLM (config asks %s)",
                               spec.name, model_config.dtype, spec.dtype)
        for i, member in enumerate(members):
            self.add_module(member_attr(i), member)
        self.cos_members = members  # plain list: the modules are registered above
        self.hidden_sizes = [m.config.hidden_size for m in members]
        self.combiner = build_combiner(cfg.rule, cfg.model_names)
        logger.info("cos: standard collaborative decoding with %s, rule %s",
                    ", ".join(cfg.model_names), cfg.rule.name)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.cos_members[self.target_index].embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds=None, **kwargs) -> torch.Tensor:
        if inputs_embeds is not None:
            raise NotImplementedError("cos: input embeddings are not supported")
        hidden = [member(input_ids=input_ids, positions=positions) for member in self.cos_members]
        return torch.cat(hidden, dim=-1)  # [num_tokens, sum(hidden sizes)]

    def member_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        parts = hidden_states.split(self.hidden_sizes, dim=-1)
        logits = [to_vocab(member.compute_logits(h), self.tokenizer_size)
                  for member, h in zip(self.cos_members, parts)]
        return torch.stack(logits)  # [n_models, num_tokens, tokenizer_size]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        combined = self.combiner(self.member_logits(hidden_states))
        return pad_vocab(combined, self.vocab_width)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        prefixes = {_OTHER_PREFIX.format(index=i): i for i in range(len(self.cos_members))}
        buckets: dict[int, list] = {i: [] for i in range(len(self.cos_members))}
        for name, tensor in weights:
            index = self.target_index
            for p, i in prefixes.items():
                if name.startswith(p):
                    index, name = i, name[len(p):]
                    break
            buckets[index].append((name, tensor))
        loaded: set[str] = set()
        for i, member in enumerate(self.cos_members):
            names = member.load_weights(buckets[i])
            loaded |= {f"{member_attr(i)}.{n}" for n in (names or ())}
        return loaded


def install() -> None:
    from vllm.model_executor.models.registry import ModelRegistry

    if STANDARD_ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(STANDARD_ARCH, CoSStandardForCausalLM)
