"""Mixture sampling for a weighted ensemble (the Mixture-model-like Ensemble, arXiv 2605.00419).

For r = sum_k w_k p_k at temperature 1 without top-k / top-p, drawing a model index k ~ w and
then the token from p_k gives P(x) = sum_k w_k p_k(x) = r(x): exact, with one model run per
token.  A model that was not picked skips the position; when it is picked again it catches up,
extending its KV cache with every token emitted since it last ran in one parallel forward.

Each request draws two uniforms per token from its own generator
(:func:`~vllm_cos.sampling.draw_uniforms`): the first picks the model, the second the token, so a
seeded request is reproducible whatever the batch.  Any other request (greedy, T != 1, top-k,
top-p) or any other rule falls back, per request, to standard collaborative decoding (every model
every token, the token from r tempered): :class:`~vllm_cos.reference.ReferenceDecoder` with
schedule standard.

Cost: a token costs sum_k w_k C_k (C_k a forward of model k) against standard's sum_k C_k, so the
speed-up over standard is at most sum_k C_k / sum_k w_k C_k (2x at equal weights for a pair).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from vllm_cos.config import CoSConfig
from vllm_cos.reference import CausalLM, DecodeStats, ReferenceDecoder, ReferenceOutput, SamplingSpec
from vllm_cos.sampling import NO_TOP_K, draw_uniforms, sample_from_probs
from vllm_cos.schedule import Schedule

UNIFORMS_PER_TOKEN = 2  # the model index, then the token


def mixture_weights(config: CoSConfig) -> torch.Tensor | None:
    """w in the order of ``config.models`` (float64 [num_models]); None unless the rule is a WE."""
    if config.rule.name != "weighted_ensemble":
        return None
    return torch.tensor([config.rule.weights[name] for name in config.model_names], dtype=torch.float64)


def is_exact_spec(spec: SamplingSpec, vocab_size: int) -> bool:
    """Mixture sampling is exact for r itself: temperature 1, top-k disabled, top-p 1."""
    top_k_off = spec.top_k <= NO_TOP_K or spec.top_k >= vocab_size
    return spec.temperature == 1.0 and top_k_off and spec.top_p >= 1.0


def mixture_sample(
    weights: torch.Tensor,  # [num_models], sums to 1
    uniforms: torch.Tensor,  # [rows, 2] float64 in [0, 1): model index, then token
    member_probs: Callable[[list[int]], torch.Tensor],  # picked model per row -> [rows, vocab]
) -> tuple[list[int], torch.Tensor]:  # picked model per row, token per row [rows] int64
    """One index-then-token step: k_i ~ w by inverse CDF on ``uniforms[i, 0]``, then token_i from
    p_{k_i} (given by ``member_probs``, called once, after the picks) on ``uniforms[i, 1]``."""
    rows = uniforms.shape[0]
    models = sample_from_probs(weights.double().expand(rows, -1), uniforms[:, 0]).tolist()
    tokens = sample_from_probs(member_probs(models), uniforms[:, 1])
    return models, tokens


@dataclass
class _Request:
    prompt: list[int]
    spec: SamplingSpec
    generator: torch.Generator | None
    caches: list
    seen: list[int]  # per model: tokens in its KV cache
    stats: DecodeStats
    output: list[int] = field(default_factory=list)
    done: bool = False

    @property
    def context(self) -> list[int]:
        return self.prompt + self.output


class MixtureDecoder:
    """Mixture sampling for exact requests, standard collaborative decoding for the others."""

    def __init__(self, config: CoSConfig, models: Sequence[CausalLM] | None = None):
        self.config = config
        self.models = list(models) if models is not None else [
            CausalLM.from_pretrained(m.path, m.dtype) for m in config.models]
        self.standard = ReferenceDecoder(config, self.models, Schedule.standard(len(self.models)))
        self.vocab_size = self.standard.vocab_size
        self.weights = mixture_weights(config)

    def is_exact(self, spec: SamplingSpec) -> bool:
        return self.weights is not None and is_exact_spec(spec, self.vocab_size)

    def generate(self, prompts: Sequence[Sequence[int]], specs: SamplingSpec | Sequence[SamplingSpec],
                 eos_token_id: int | None = None) -> list[ReferenceOutput]:
        if isinstance(specs, SamplingSpec):
            specs = [specs] * len(prompts)
        start = time.perf_counter()
        outputs: list[ReferenceOutput | None] = [None] * len(prompts)
        exact = [self.is_exact(s) for s in specs]
        fallback = [i for i, e in enumerate(exact) if not e]
        mixed = [i for i, e in enumerate(exact) if e]
        if fallback:
            results = self.standard.generate([prompts[i] for i in fallback], [specs[i] for i in fallback],
                                             eos_token_id)
            for i, out in zip(fallback, results):
                outputs[i] = out
        if mixed:
            results = self._decode([prompts[i] for i in mixed], [specs[i] for i in mixed], eos_token_id)
            for i, out in zip(mixed, results):
                outputs[i] = out
        elapsed = time.perf_counter() - start
        for out in outputs:
            out.stats.seconds = elapsed
        return outputs

    # ------------------------------------------------------------------ mixture sampling
    def _decode(self, prompts, specs, eos_token_id) -> list[ReferenceOutput]:
        n = len(self.models)
        requests = [
            _Request(list(p), s, None if s.seed is None else torch.Generator().manual_seed(s.seed),
                     [m.new_cache() for m in self.models], [0] * n, DecodeStats(forwards=[0] * n))
            for p, s in zip(prompts, specs)]
        active = [r for r in requests if r.spec.max_tokens > 0]
        while active:
            uniforms = torch.stack(draw_uniforms([UNIFORMS_PER_TOKEN] * len(active),
                                                 [r.generator for r in active]))

            def member_probs(picked: list[int]) -> torch.Tensor:
                logits = [self._catch_up(r, k) for r, k in zip(active, picked)]
                return torch.softmax(torch.stack(logits), dim=-1)

            _, tokens = mixture_sample(self.weights, uniforms, member_probs)
            for r, token in zip(active, tokens.tolist()):
                self._emit(r, token, eos_token_id)
            active = [r for r in active if not r.done]
        return [ReferenceOutput(r.output, r.stats) for r in requests]

    def _catch_up(self, r: _Request, k: int) -> torch.Tensor:  # [vocab] raw logits of the next token
        """Model k reads, in one forward, every token of the context it has not seen."""
        unseen = r.context[r.seen[k]:]
        logits = self.models[k].extend(r.caches[k], unseen)[-1, : self.vocab_size]
        r.seen[k] += len(unseen)
        r.stats.forwards[k] += 1
        return logits.float()

    @staticmethod
    def _emit(r: _Request, token: int, eos_token_id) -> None:
        r.output.append(token)
        r.stats.emitted += 1
        if token == eos_token_id or len(r.output) >= r.spec.max_tokens:
            r.done = True
            r.caches = []  # a finished request's KV caches are not needed any more
