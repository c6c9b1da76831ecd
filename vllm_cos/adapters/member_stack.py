"""Hook: several collaborators as one vLLM model (two architectures).

:class:`CoSMemberStack` holds collaborators as submodules, each built by vLLM's own model
class with its own attention layers, so every collaborator's KV lives in vLLM's paged cache
(one block table for all) and vLLM's memory profiling sees all weights.  It runs every
member on the same tokens.

* ``standard``: :class:`CoSStandardForCausalLM` is the served architecture, holding every
  collaborator; its ``compute_logits`` returns log r.  The stock sampler then applies the
  request's temperature / top-k / top-p / seed to r, reports logprobs of r, and everything
  else (stop strings, n > 1, continuous batching, prefix caching, chunked prefill) is stock.
  Selected by ``hf_overrides={"architectures": ["CoSStandardForCausalLM"]}`` (set by
  :mod:`vllm_cos.adapters.engine_args`).
* ``naive`` / ``alternate``: :class:`CoSDraftGroupForCausalLM` is the drafter the CoS
  proposer loads (:mod:`vllm_cos.adapters.spec_decode`): every collaborator except the
  served one, 1 to n-1 models.

The CoS config comes from ``vllm_config.additional_config["cos"]``.

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

from vllm_cos.adapters.step import StepInvariantError
from vllm_cos.engine import DRAFT_GROUP_ARCH, STANDARD_ARCH, config_from_additional

logger = logging.getLogger("vllm.cos")  # under vLLM's configured "vllm" logger

_OTHER_PREFIX = "cos_weights_{index}."


def member_attr(index: int) -> str:
    """Submodule name of a member; no digits (vLLM reads the layer index from the name)."""
    return "cos_member_" + "abcdefghijklmnopqrstuvwxyz"[index]


def member_model_config(vllm_config, path: str, **extra):
    """A vLLM ModelConfig for one collaborator, matching the served model's settings."""
    from vllm.config import ModelConfig

    base = vllm_config.model_config
    return ModelConfig(
        **extra,
        model=path,
        tokenizer=base.tokenizer,
        tokenizer_mode=base.tokenizer_mode,
        trust_remote_code=base.trust_remote_code,
        dtype=base.dtype,  # one dtype for every member (engine.engine_dtype checks the file)
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


class CoSMemberStack(nn.Module):
    """Several collaborators in one vLLM model: each a submodule built by vLLM's own class.

    Every member has its own attention layers (distinct prefixes), so its KV lives in vLLM's
    paged cache under the same block table as the others.  ``forward`` runs every member on
    the same tokens and concatenates their hidden states; :meth:`member_logits` splits them
    again.  The checkpoint vLLM loads is the one of ``vllm_config.model_config``; the other
    members' checkpoints are read through ``secondary_weights``.  Subclasses choose the
    members (:meth:`layout`).
    """

    def layout(self, cfg) -> tuple[list[int], int]:
        """(config indices of the members in order, index of the member vLLM's checkpoint is)."""
        raise NotImplementedError

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__()
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

        carried = config_from_additional(vllm_config.additional_config)
        if carried is None:
            raise RuntimeError(f"cos: {type(self).__name__} needs additional_config['cos'] "
                               "(start it with --speculative-config cos.yaml)")
        self.cos_config, self.tokenizer_size = carried
        cfg = self.cos_config
        self.member_indices, primary = self.layout(cfg)
        self.vocab_width = vllm_config.model_config.get_vocab_size()
        members = []
        self.secondary_weights = []
        for i in self.member_indices:
            spec = cfg.models[i]
            model_config = member_model_config(vllm_config, spec.path)
            if i != primary:
                self.secondary_weights.append(DefaultModelLoader.Source(
                    spec.path, None, prefix=_OTHER_PREFIX.format(index=i)))
            name = member_attr(i)
            members.append(build_member(vllm_config, model_config, prefix=f"{prefix}.{name}".lstrip(".")))
            if spec.dtype not in ("auto", str(model_config.dtype).replace("torch.", "")):
                raise RuntimeError(f"cos config: models[{i}].dtype: is {spec.dtype} but the engine runs "
                                   f"in {model_config.dtype}; vLLM runs every collaborator in one dtype")
        for i, member in zip(self.member_indices, members):
            self.add_module(member_attr(i), member)
        self.cos_members = members  # plain list: the modules are registered above
        self.primary = primary
        self.hidden_sizes = [m.config.hidden_size for m in members]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.cos_members[self.member_indices.index(self.primary)].embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds=None, cos_members: tuple[int, ...] | None = None, **kwargs) -> torch.Tensor:
        """Every member's hidden states, concatenated; ``cos_members``: only these members run
        (positions in the stack; the others' KV is not written and their hidden states are 0)."""
        if inputs_embeds is not None:
            raise NotImplementedError("cos: input embeddings are not supported")
        hidden = [member(input_ids=input_ids, positions=positions) if cos_members is None or m in cos_members
                  else None for m, member in enumerate(self.cos_members)]
        ran = next(h for h in hidden if h is not None)
        hidden = [ran.new_zeros(ran.shape[0], size) if h is None else h for h, size in zip(hidden, self.hidden_sizes)]
        return torch.cat(hidden, dim=-1)  # [num_tokens, sum(hidden sizes)]

    def member_logits(self, hidden_states: torch.Tensor, members: tuple[int, ...] | None = None) -> torch.Tensor:
        """[num_members, num_tokens, tokenizer_size]; ``members``: only these are computed (0 elsewhere)."""
        parts = hidden_states.split(self.hidden_sizes, dim=-1)
        logits = [to_vocab(member.compute_logits(h), self.tokenizer_size) if members is None or m in members
                  else None for m, (member, h) in enumerate(zip(self.cos_members, parts))]
        ran = next(x for x in logits if x is not None)
        return torch.stack([ran.new_zeros(ran.shape) if x is None else x for x in logits])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        prefixes = {_OTHER_PREFIX.format(index=i): i for i in self.member_indices}
        buckets: dict[int, list] = {i: [] for i in self.member_indices}
        for name, tensor in weights:
            index = self.primary
            for p, i in prefixes.items():
                if name.startswith(p):
                    index, name = i, name[len(p):]
                    break
            buckets[index].append((name, tensor))
        loaded: set[str] = set()
        for i, member in zip(self.member_indices, self.cos_members):
            names = member.load_weights(buckets[i])
            loaded |= {f"{member_attr(i)}.{n}" for n in (names or ())}
        return loaded


class CoSStandardForCausalLM(CoSMemberStack):
    """The served architecture of ``standard``: all collaborators; logits = log r."""

    def layout(self, cfg) -> tuple[list[int], int]:
        return list(range(len(cfg.models))), cfg.index(cfg.target)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        from vllm_cos.combine import build_combiner

        cfg = self.cos_config
        self.combiner = build_combiner(cfg.rule, cfg.model_names)
        self._bound_rows = None  # (row_params, num_rows) of the next compute_logits (standard_rows)
        logger.info("cos: standard collaborative decoding with %s, rule %s",
                    ", ".join(cfg.model_names), cfg.rule.name)

    @property
    def rows_device(self) -> torch.device:
        return next(self.parameters()).device

    def bind_rows(self, row_params: dict | None, num_rows: int = 0) -> None:
        """The requests' own rule parameters for the next ``compute_logits`` call (its
        ``num_rows`` rows; None: the file's), set by :mod:`vllm_cos.adapters.standard_rows`."""
        self._bound_rows = None if not row_params else (row_params, num_rows)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        row_params = None
        if self._bound_rows is not None:
            (row_params, num_rows), self._bound_rows = self._bound_rows, None
            if hidden_states.shape[0] != num_rows:
                raise StepInvariantError("standard-rows", f"the requests' settings were bound for {num_rows} "
                                         f"rows but compute_logits got {hidden_states.shape[0]}")
        combined = self.combiner(self.member_logits(hidden_states), **(row_params or {}))
        return pad_vocab(combined, self.vocab_width)


class CoSDraftGroupForCausalLM(CoSMemberStack):
    """The drafter of ``naive`` / ``alternate``: every collaborator except the served one.

    One drafter forward runs all of them on the same tokens, so each member's logits are
    known at every position any of them drafted (what r needs there).
    """

    def layout(self, cfg) -> tuple[list[int], int]:
        indices = [i for i in range(len(cfg.models)) if cfg.models[i].name != cfg.target]
        return indices, indices[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("cos: the draft group has one set of logits per member; use member_logits")


def install() -> None:
    from vllm.model_executor.models.registry import ModelRegistry

    for arch, cls in ((STANDARD_ARCH, CoSStandardForCausalLM), (DRAFT_GROUP_ARCH, CoSDraftGroupForCausalLM)):
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, cls)
