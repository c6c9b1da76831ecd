"""Combination rules: r = C(p_1, ..., p_n), batched over positions.

Every rule maps the members' raw logits ``member_logits`` ``[num_models, num_tokens, vocab]``
to ``combined_logits`` ``[num_tokens, vocab]``: log r up to an additive constant per row.
The request's temperature / top-k / top-p are applied afterwards, once, to r
(:func:`vllm_cos.sampling.apply_sampling_params`).

Rules are chosen by name from ``RULES`` (``cosd``: CoSD's deterministic token choice, one-hot r;
:mod:`vllm_cos.cosd`) or, for a user's function, by an import path
``module:function`` (never eval).  A custom function declares whether it takes
probabilities or logits; it returns a tensor of the same kind, shape ``[num_tokens, vocab]``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

CombineFn = Callable[[torch.Tensor], torch.Tensor]

# name -> builder(rule_config, model_names) -> CombineFn
RULES: dict[str, Callable[..., CombineFn]] = {}


def register_rule(name: str):
    def decorate(builder):
        RULES[name] = builder
        return builder
    return decorate


def weighted_ensemble(
    member_logits: torch.Tensor,  # [num_models, num_tokens, vocab]
    weights: torch.Tensor,  # [num_models] (or [num_models, num_tokens]: per row), sums to 1
) -> torch.Tensor:  # [num_tokens, vocab] = log(sum_k w_k softmax(l_k))
    member_logprobs = torch.log_softmax(member_logits.float(), dim=-1)
    log_weights = torch.log(weights.float().to(member_logits.device))
    log_weights = log_weights.view(*log_weights.shape, *([1] * (3 - log_weights.dim())))
    return torch.logsumexp(member_logprobs + log_weights, dim=0)


def contrastive(
    member_logits: torch.Tensor,  # [num_models, num_tokens, vocab]
    expert: int,
    amateur: int,
    mu: float | torch.Tensor,  # or [num_tokens]: per row
) -> torch.Tensor:  # [num_tokens, vocab] = l_expert - mu * l_amateur
    expert_logits = member_logits[expert].float()
    amateur_logits = member_logits[amateur].float()
    # A token masked (-inf) for either model stays masked.
    masked = torch.isinf(expert_logits) | torch.isinf(amateur_logits)
    if isinstance(mu, torch.Tensor):
        mu = mu.float().to(member_logits.device).view(-1, 1)
    combined = expert_logits - mu * amateur_logits
    return combined.masked_fill(masked, float("-inf"))


@register_rule("weighted_ensemble")
def _build_weighted_ensemble(rule, model_names: list[str]) -> CombineFn:
    weights = torch.tensor([rule.weights[name] for name in model_names], dtype=torch.float32)
    return lambda member_logits, weights=weights: weighted_ensemble(member_logits, weights)


@register_rule("contrastive")
def _build_contrastive(rule, model_names: list[str]) -> CombineFn:
    expert, amateur = model_names.index(rule.expert), model_names.index(rule.amateur)
    return lambda member_logits, mu=rule.mu: contrastive(member_logits, expert, amateur, mu)


@register_rule("custom")
def _build_custom(rule, model_names: list[str]) -> CombineFn:
    function = load_function(rule.function)
    params = dict(rule.params)

    def combine_custom(member_logits):  # [num_models, num_tokens, vocab]
        inputs = torch.softmax(member_logits.float(), dim=-1) if rule.inputs == "probs" else member_logits.float()
        result = function(inputs, **params)
        if not isinstance(result, torch.Tensor) or result.shape != member_logits.shape[1:]:
            shape = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
            raise ValueError(f"custom rule {rule.function}: must return [num_tokens, vocab] = "
                             f"{tuple(member_logits.shape[1:])}, got {shape}")
        return torch.log(result.float()) if rule.inputs == "probs" else result.float()

    return combine_custom


@register_rule("cosd")
def _build_cosd(rule, model_names: list[str]) -> CombineFn:
    """CoSD: log r is 0 at the verifier's choice between the draft's and the assistant's top
    tokens, -inf elsewhere (:mod:`vllm_cos.cosd`)."""
    from vllm_cos.cosd import build_cosd

    return build_cosd(rule, model_names)


def load_function(import_path: str) -> Callable:
    """Resolve ``package.module:function``; raises ValueError naming the path."""
    module_name, sep, attr = import_path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"custom rule function {import_path!r} must look like 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"custom rule function {import_path!r}: cannot import {module_name!r} ({exc})") from exc
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"custom rule function {import_path!r}: {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"custom rule function {import_path!r} is not callable")
    return target


@dataclass(frozen=True)
class Combiner:
    """A combination rule bound to the order of the collaborating models."""

    model_names: tuple[str, ...]
    fn: CombineFn

    def __call__(self, member_logits: torch.Tensor, **row_params) -> torch.Tensor:
        """log r [num_tokens, vocab]; ``row_params``: per-row rule parameters (``weights``
        [num_models, num_tokens] or ``mu`` [num_tokens], vllm_cos.overrides)."""
        return self.fn(member_logits, **row_params) if row_params else self.fn(member_logits)


def build_combiner(rule, model_names) -> Combiner:
    names = list(model_names)
    return Combiner(tuple(names), RULES[rule.name](rule, names))
