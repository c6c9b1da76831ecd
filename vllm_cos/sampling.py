"""Request sampling parameters applied to a distribution given as logits.

CoS defines the combined distribution r on the members' *raw* distributions and then
applies the request's temperature, top-k and top-p once, to r (DESIGN.md).  The same
function turns a proposer's raw logits into the proposal distribution it samples from.

Temperature 0 means greedy: the result is one-hot on the argmax (first index on ties).
With one-hot r and q, speculative verification reduces to "accept iff the draft is the
argmax of r, otherwise emit argmax r", so greedy needs no separate path downstream.
"""

from __future__ import annotations

import torch

NO_TOP_K = 0  # top_k <= 0 (or >= vocab) disables top-k, as in vLLM


def apply_sampling_params(
    logits: torch.Tensor,  # [num_tokens, vocab], any real scale; -inf masks a token
    temperature: torch.Tensor,  # [num_tokens] float; 0 = greedy
    top_k: torch.Tensor | None = None,  # [num_tokens] int; <= 0 disables
    top_p: torch.Tensor | None = None,  # [num_tokens] float in (0, 1]; 1 disables
    min_p: torch.Tensor | None = None,  # [num_tokens] float in [0, 1]; 0 disables
    all_greedy: bool | None = None,  # known for the batch: True every row, False none; None: look
) -> torch.Tensor:  # [num_tokens, vocab] float32 probabilities
    """Temperature, then min_p (on the tempered distribution), then top-k / top-p, as vLLM's
    sampler orders them; greedy rows (temperature 0) are one-hot on the argmax (which no mask
    moves: each keeps the best token)."""
    logits = logits.float()
    if all_greedy:  # no softmax, no masks, no host check
        return _one_hot_argmax(logits)
    greedy = temperature <= 0
    safe_temperature = torch.where(greedy, torch.ones_like(temperature), temperature)
    scaled = logits / safe_temperature.float().unsqueeze(-1)
    if min_p is not None and bool((min_p > 0).any()):
        scaled = _mask_min_p(scaled, min_p.float())
    uses_top_k = top_k is not None and bool(((top_k > 0) & (top_k < logits.shape[-1])).any())
    uses_top_p = top_p is not None and bool((top_p < 1).any())
    if uses_top_k or uses_top_p:
        scaled = _mask_top_k_top_p(scaled, top_k if uses_top_k else None, top_p if uses_top_p else None)
    probs = torch.softmax(scaled, dim=-1)
    if all_greedy is None and bool(greedy.any()):
        probs = torch.where(greedy.unsqueeze(-1), _one_hot_argmax(logits), probs)
    return probs


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:  # [num_tokens, vocab] -> same, float32
    """One-hot on each row's argmax (first index on ties): a greedy row's distribution."""
    return torch.zeros_like(logits).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)


def _mask_min_p(
    scaled: torch.Tensor,  # [num_tokens, vocab] tempered logits
    min_p: torch.Tensor,  # [num_tokens]
) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's largest probability."""
    probs = torch.softmax(scaled, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(-1)
    return scaled.masked_fill(probs < threshold, float("-inf"))


def _mask_top_k_top_p(
    scaled: torch.Tensor,  # [num_tokens, vocab] tempered logits
    top_k: torch.Tensor | None,  # [num_tokens]
    top_p: torch.Tensor | None,  # [num_tokens]
) -> torch.Tensor:
    vocab = scaled.shape[-1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [num_tokens, vocab]
    rank = torch.arange(vocab, device=scaled.device).expand_as(sorted_logits)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        k = top_k.to(rank.dtype)
        k = torch.where(k <= 0, torch.full_like(k, vocab), k.clamp(max=vocab))
        drop |= rank >= k.unsqueeze(-1)
    if top_p is not None:
        kept = sorted_logits.masked_fill(drop, float("-inf"))
        sorted_probs = torch.softmax(kept, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly better tokens
        drop |= mass_before >= top_p.float().unsqueeze(-1)
    drop[..., 0] = False  # the best token always survives
    masked_sorted = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(-1, order, masked_sorted)


def sample_from_probs(
    probs: torch.Tensor,  # [num_tokens, vocab], rows need not be normalised
    uniforms: torch.Tensor,  # [num_tokens] float64 in [0, 1)
) -> torch.Tensor:  # [num_tokens] int64
    """Inverse-CDF sampling: one uniform per row, exact for any row scale."""
    cdf = probs.double().cumsum(dim=-1)  # [num_tokens, vocab]
    threshold = (uniforms.double() * cdf[:, -1]).unsqueeze(-1)
    token = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)
    return token.clamp_(max=probs.shape[-1] - 1)


def draw_uniforms(
    counts: list[int],  # how many uniforms each row needs
    generators: list[torch.Generator | None] | None,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """Per-row float64 uniforms in [0, 1).

    A row with its own generator draws exactly ``counts[i]`` numbers from it, so a seeded
    request produces the same stream whatever else is in the batch.
    """
    if generators is None or all(g is None for g in generators):
        flat = torch.rand(sum(counts), dtype=torch.float64, device=device)
        return list(flat.split(counts))
    return [torch.rand(c, dtype=torch.float64, generator=g, device=device)
            for c, g in zip(counts, generators)]
