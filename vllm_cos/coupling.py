"""Position-keyed sampling for seeded requests: the same seed gives the same text whatever the
batch, the draft lengths or preemption did.

A seeded request's random numbers cannot come from a stream (a ``torch.Generator`` advanced per
draw): how many numbers a CoS step draws depends on how many drafts it verified, which depends
on the load, the draft-length controller and on preemption (a preempted request's pending
drafts are lost).  Instead every token of a seeded request is drawn by an *exponential race*
with noise that depends only on (seed, output position, token):

    token_p = argmax_x  prob_p(x) / E_{seed, p}(x),    E ~ Exp(1) i.i.d. over x

which is an exact draw from prob_p (the Gumbel-max trick).  The served model's proposal, each
drafter's draft and the emitted token at output position p all race with the *same* noise, so:

* the emitted token at p is always race(r_p, E_p): r's own draw, the same one whoever proposed;
* a draft (or the served proposal) at p is accepted iff its race, with q_p, picked that token,
  and at the first mismatch r's token is emitted (:func:`coupled_verify`).

Every emitted token is exactly distributed as r (the races at different positions use
independent noise and r_p depends only on earlier tokens), and the text depends on nothing but
the seed and r.  The acceptance rate is P(race(q) = race(r)) >= sum_x min(q, r) / (2 - sum_x
min(q, r)), close to the optimal sum_x min(q, r) when q is near r.  Unseeded rows keep the
standard min(1, r/q) test (:mod:`vllm_cos.verify`).

The noise is a counter-based hash (32-bit lanes in int64, no generator state), batched over
rows and the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32) on int64 tensors holding values < 2^32."""
    x = x & _MASK
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def race_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int, salt: int = 0) -> torch.Tensor:
    """Exp(1) noise [N, vocab] float64 for rows keyed by (``seeds`` [N], ``positions`` [N])."""
    device = positions.device
    seeds = seeds.to(device=device, dtype=torch.int64)
    key = _mix32(_mix32(_mix32(seeds & _MASK) ^ ((seeds >> 32) & _MASK) ^ salt)
                 ^ positions.to(torch.int64) & _MASK)  # [N]
    token = torch.arange(vocab, device=device, dtype=torch.int64)
    bits = _mix32(_mix32(key.unsqueeze(1) ^ token * 0x9E3779B1) + 0x632BE5AB)  # [N, V] in [0, 2^32)
    uniform = (bits.double() + 0.5) / 2.0**32  # (0, 1)
    return -torch.log(uniform)


def race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax_x probs(x) / noise(x) per row: an exact draw from ``probs`` [N, V] (any row scale)."""
    return (probs.double() / noise).argmax(dim=-1)


@dataclass
class CoupledVerifyOutput:
    token_ids: torch.Tensor  # [batch, max_drafts + 1] int64, -1 after the emitted ones
    num_accepted: torch.Tensor  # [batch] int64
    rejected: torch.Tensor  # [batch] bool


def coupled_verify(draft_token_ids: torch.Tensor, num_drafts: torch.Tensor, target_probs: torch.Tensor,
                   noise: torch.Tensor) -> CoupledVerifyOutput:
    """Drafts [B, K] (``num_drafts`` [B] usable) against r [B, K, V] with each position's noise
    [B, K, V]: accepted while a draft is r's own race winner; at the first mismatch r's winner is
    emitted and the row is rejected.  Rows with every draft accepted emit only the drafts."""
    batch, k = draft_token_ids.shape
    device = draft_token_ids.device
    winners = race(target_probs.reshape(batch * k, -1), noise.reshape(batch * k, -1)).view(batch, k)  # [B, K]
    column = torch.arange(k, device=device)
    usable = column.unsqueeze(0) < num_drafts.unsqueeze(1)  # [B, K]
    match = (draft_token_ids == winners) & usable
    num_accepted = match.long().cumprod(dim=1).sum(dim=1)  # [B]
    rejected = num_accepted < num_drafts
    token_ids = torch.full((batch, k + 1), -1, dtype=torch.long, device=device)
    emitted = column.unsqueeze(0) < (num_accepted + rejected.long()).unsqueeze(1)  # [B, K]
    token_ids[:, :k] = torch.where(emitted, winners, -1)
    return CoupledVerifyOutput(token_ids, num_accepted, rejected)
