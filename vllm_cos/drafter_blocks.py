"""Self-drafted blocks: the drafter's own continuations, as the engine verifies them.

Teacher forcing (:mod:`vllm_cos.drafter_training`) conditions every draft position on the TRUE
previous tokens, so each position of a block is the same problem and alpha_j is flat in j.  In
decoding, draft position j is conditioned on the drafter's own drafts 1..j-1 (kept only if all
were accepted).  Here a block is made that way: a context of ``context`` true tokens, then
``gamma`` tokens sampled from the drafter's q one after the other (seeded); r is the teacher's
combined distribution at the same drafted positions.

For one drafted path x_1..x_gamma, draft j survives verification with probability
``a_j = min(1, r_j(x_j) / q_j(x_j))`` given that 1..j-1 survived, so the expected number of
accepted drafts of a block is exactly ``E[sum_j prod_{i<=j} a_i]`` over paths x ~ q
(:func:`path_acceptance`, :func:`drafted_metrics`); no teacher-forcing surrogate.

Uses torch only (the models are passed in).
"""

from __future__ import annotations

import torch


def eval_contexts(windows: torch.Tensor, context: int, gamma: int) -> torch.Tensor:
    """``[N, W]`` -> ``[N * K, context]``: in every window, the ``context`` tokens before each
    block start ``context, context + gamma, ...`` whose ``gamma`` positions fit in the window
    (deterministic; K = (W - context) // gamma)."""
    num_windows, window = windows.shape
    per_window = (window - context) // gamma
    if per_window <= 0:
        raise ValueError(f"--context {context} + --gamma {gamma}: longer than a window of {window} tokens")
    starts = torch.arange(per_window) * gamma  # [K] first context token of each block
    columns = starts[:, None] + torch.arange(context)[None, :]  # [K, context]
    return windows[:, columns].reshape(num_windows * per_window, context)


def random_contexts(windows: torch.Tensor, rows: int, context: int, generator: torch.Generator) -> torch.Tensor:
    """``rows`` contexts ``[rows, context]``, each ``context`` consecutive tokens of a random
    window at a random offset (seeded by ``generator``)."""
    num_windows, window = windows.shape
    which = torch.randint(num_windows, (rows,), generator=generator)
    offset = torch.randint(window - context + 1, (rows,), generator=generator)
    columns = offset[:, None] + torch.arange(context)[None, :]  # [rows, context]
    return windows[which[:, None], columns]


@torch.no_grad()
def sample_drafts(drafter, context_ids: torch.Tensor, gamma: int, generator: torch.Generator) -> torch.Tensor:
    """``[R, C]`` -> ``[R, C + gamma]``: ``gamma`` tokens drawn one after the other from the
    drafter's q = softmax(logits) (T = 1: the tempered proposal of an r without temperature)."""
    ids = context_ids
    for _ in range(gamma):
        last_logits = drafter(ids).logits[:, -1].float()  # [R, V]
        probs = torch.softmax(last_logits, dim=-1).cpu()
        token = torch.multinomial(probs, 1, generator=generator).to(ids.device)  # [R, 1]
        ids = torch.cat([ids, token], dim=1)
    return ids


def drafted_pair(drafter, teacher, context_ids: torch.Tensor, gamma: int, generator: torch.Generator):
    """(draft_logits ``[R, gamma, V]`` with the drafter's gradient, combined_probs
    ``[R, gamma, V]``, drafts ``[R, gamma]``) at the drafter's own sampled continuations."""
    context = context_ids.shape[1]
    was_training = drafter.training
    drafter.eval()
    ids = sample_drafts(drafter, context_ids.to(teacher.device), gamma, generator)  # [R, C + gamma]
    drafter.train(was_training)
    positions = slice(context - 1, context + gamma - 1)  # logits at these predict the drafts
    draft_logits = drafter(ids).logits[:, positions].float()
    combined_probs = teacher.combined_probs(ids)[:, positions]
    return draft_logits, combined_probs, ids[:, context:]


def path_acceptance(
    draft_probs: torch.Tensor,  # [R, gamma, V] q at the drafted positions
    combined_probs: torch.Tensor,  # [R, gamma, V] r at the same positions
    drafts: torch.Tensor,  # [R, gamma] the sampled tokens
) -> torch.Tensor:  # [R, gamma] a_j = min(1, r_j(x_j) / q_j(x_j))
    q_of_draft = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    r_of_draft = combined_probs.gather(-1, drafts[..., None]).squeeze(-1)
    return torch.clamp(r_of_draft / q_of_draft.clamp_min(1e-30), max=1.0)


def drafted_metrics(survival_sum: torch.Tensor, blocks: int) -> dict:
    """From ``survival_sum`` ``[gamma]`` = sum over blocks of ``prod_{i<=j} a_i``: the
    conditional acceptance alpha_j = P(j survives | 1..j-1 survived) and the mean accepted
    length (draft tokens only, no bonus token)."""
    survival = survival_sum / blocks  # [gamma] P(drafts 1..j all accepted)
    reached = torch.cat([torch.ones(1, dtype=survival.dtype), survival[:-1]])
    alphas = torch.where(reached > 0, survival / reached.clamp_min(1e-300), torch.zeros_like(survival))
    return {"acceptance": alphas.tolist(), "accepted_length": float(survival.sum()), "blocks": blocks}
