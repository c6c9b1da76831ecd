"""vllm_cos.coupling: position-keyed exponential races for seeded requests (pure tensor math)."""

from __future__ import annotations

import torch
from stats import P_THRESHOLD, chi2_pvalue

from vllm_cos.coupling import coupled_verify, race, race_noise

V = 12


def _dist(seed: int, zeros: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(V, generator=g) ** 2
    p[:zeros] = 0.0  # masked tokens are never drawn
    return p / p.sum()


def test_race_over_positions_is_an_exact_draw():
    """200k positions of one seed (and 200k seeds at one position) against p: chi^2."""
    p = _dist(0)
    n = 200_000
    by_position = race(p.expand(n, V), race_noise(torch.full((n,), 1234), torch.arange(n), V))
    by_seed = race(p.expand(n, V), race_noise(torch.arange(n) * 7919 + 3, torch.full((n,), 5), V))
    for tokens in (by_position, by_seed):
        counts = torch.bincount(tokens, minlength=V)
        assert counts[:2].sum() == 0
        assert chi2_pvalue(counts.numpy(), p.numpy()) > P_THRESHOLD


def test_noise_is_a_function_of_seed_position_token_only():
    seeds, positions = torch.tensor([1, 2, 1, 2**40 + 1]), torch.tensor([0, 0, 3, 0])
    a = race_noise(seeds, positions, V)
    b = race_noise(seeds.flip(0), positions.flip(0), V).flip(0)  # rows in another order
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2]) and not torch.equal(a[0], a[3])
    assert torch.equal(race_noise(seeds[:1], positions[:1], V), a[:1])  # alone or in a batch
    assert (a > 0).all() and torch.isfinite(a).all()


def test_pairs_of_positions_are_independent():
    """(token at p, token at p + 1) over 100k p: the joint is the product of the marginals."""
    p = _dist(1, zeros=0)
    n = 100_000
    tokens = race(p.expand(n + 1, V), race_noise(torch.full((n + 1,), 99), torch.arange(n + 1), V))
    joint = torch.bincount(tokens[:-1] * V + tokens[1:], minlength=V * V)
    assert chi2_pvalue(joint.numpy(), torch.outer(p, p).flatten().numpy()) > P_THRESHOLD


def test_coupled_verify_emits_r_s_winner_whatever_was_drafted():
    """Each emitted token is r's race winner at its position, so the first token after any
    drafts follows r exactly (chi^2 over 100k rows with drafts from a different q)."""
    n, k = 100_000, 3
    r, q = _dist(2), _dist(3, zeros=0)
    noise = race_noise(torch.full((n * k,), 7), torch.arange(n * k), V).view(n, k, V)
    drafts = race(q.expand(n * k, V), noise.view(n * k, V)).view(n, k)  # drafts race with the same noise
    out = coupled_verify(drafts, torch.full((n,), k), r.expand(n, k, V), noise)
    winners = race(r.expand(n * k, V), noise.view(n * k, V)).view(n, k)
    emitted = out.num_accepted + out.rejected.long()
    for row in range(0, n, 9973):  # the emitted prefix is r's winners, the rest -1
        e = int(emitted[row])
        assert out.token_ids[row, :e].tolist() == winners[row, :e].tolist()
        assert (out.token_ids[row, e:] == -1).all()
    counts = torch.bincount(out.token_ids[:, 0], minlength=V)
    assert chi2_pvalue(counts.numpy(), r.numpy()) > P_THRESHOLD
    accept_rate = (drafts[:, 0] == winners[:, 0]).double().mean().item()
    overlap = torch.minimum(r, q).sum().item()
    assert overlap / (2 - overlap) - 0.01 < accept_rate <= overlap + 0.01


def test_coupled_verify_counts_and_edges():
    noise = race_noise(torch.tensor([5, 5, 5]), torch.tensor([0, 1, 2]), V).view(1, 3, V).expand(3, 3, V)
    r = torch.zeros(3, 3, V)
    r[:, :, 4] = 1.0  # greedy: r one-hot on 4
    drafts = torch.tensor([[4, 4, 4], [4, 9, 4], [9, 4, 4]])
    out = coupled_verify(drafts, torch.tensor([3, 3, 0]), r, noise)
    assert out.num_accepted.tolist() == [3, 1, 0] and out.rejected.tolist() == [False, True, False]
    assert out.token_ids.tolist() == [[4, 4, 4, -1], [4, 4, -1, -1], [-1, -1, -1, -1]]
