"""vllm_cos.drafter_blocks: contexts, per-path acceptance by hand, and the sampled estimate of the
expected accepted length against the exact sum over every path (a bigram toy drafter and r)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from vllm_cos.drafter_blocks import drafted_metrics, drafted_pair, eval_contexts, path_acceptance, random_contexts


class Bigram(torch.nn.Module):
    """A "model" whose next-token distribution depends on the last token only: ``table[last]``."""

    def __init__(self, table: torch.Tensor):  # [V, V] rows sum to 1
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor):  # [R, L] -> logits [R, L, V]
        return SimpleNamespace(logits=self.table[ids].log())


class BigramTeacher:
    def __init__(self, table: torch.Tensor):
        self.table, self.device = table, "cpu"

    def combined_probs(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


def test_eval_contexts_take_the_tokens_before_every_block():
    windows = torch.arange(2 * 10).view(2, 10)
    contexts = eval_contexts(windows, context=3, gamma=2)  # block starts 3, 5, 7 -> (10 - 3) // 2 = 3 per window
    assert contexts.tolist() == [[0, 1, 2], [2, 3, 4], [4, 5, 6], [10, 11, 12], [12, 13, 14], [14, 15, 16]]
    with pytest.raises(ValueError, match="--context"):
        eval_contexts(windows, context=9, gamma=2)


def test_random_contexts_are_consecutive_tokens_of_a_window():
    windows = torch.arange(3 * 20).view(3, 20)
    contexts = random_contexts(windows, rows=50, context=5, generator=torch.Generator().manual_seed(0))
    assert contexts.shape == (50, 5)
    assert torch.all(contexts[:, 1:] - contexts[:, :-1] == 1)
    assert torch.all(contexts[:, 0] // 20 == contexts[:, -1] // 20)  # one window each


def test_path_acceptance_by_hand():
    q = torch.tensor([[[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]]])  # [1, 2, 3]
    r = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]])
    drafts = torch.tensor([[1, 2]])
    # a_1 = min(1, .3 / .5) = .6 ; a_2 = min(1, .3 / .1) = 1
    assert path_acceptance(q, r, drafts)[0].tolist() == pytest.approx([0.6, 1.0])
    metrics = drafted_metrics(torch.tensor([3.0, 1.5, 0.75], dtype=torch.float64), blocks=4)
    # survival .75, .375, .1875 -> alpha .75, .5, .5 ; length = .75 + .375 + .1875
    assert metrics["acceptance"] == pytest.approx([0.75, 0.5, 0.5])
    assert metrics["accepted_length"] == pytest.approx(1.3125) and metrics["blocks"] == 4


def exact_survival(q_table: torch.Tensor, r_table: torch.Tensor, last: int, gamma: int) -> list[float]:
    """P(drafts 1..j all accepted) = sum over paths of prod_i min(q, r)(x_i | x_{i-1})."""
    overlap = torch.minimum(q_table, r_table).double()
    vocab = len(q_table)
    out = []
    for j in range(1, gamma + 1):
        total = 0.0
        for path in itertools.product(range(vocab), repeat=j):
            prev, prob = last, 1.0
            for token in path:
                prob *= float(overlap[prev, token])
                prev = token
            total += prob
        out.append(total)
    return out


def test_sampled_paths_estimate_the_exact_accepted_length():
    torch.manual_seed(0)
    vocab, gamma, rows = 4, 3, 100_000
    q_table = torch.softmax(torch.randn(vocab, vocab) * 1.5, dim=-1)
    r_table = torch.softmax(torch.randn(vocab, vocab) * 1.5, dim=-1)
    drafter, teacher = Bigram(q_table), BigramTeacher(r_table)
    contexts = torch.full((rows, 2), 2, dtype=torch.long)  # last context token 2
    draft_logits, combined_probs, drafts = drafted_pair(drafter, teacher, contexts, gamma,
                                                        torch.Generator().manual_seed(1))
    assert draft_logits.shape == (rows, gamma, vocab) and drafts.shape == (rows, gamma)
    # the drafted positions' r is the teacher's at the drafted prefix
    prev = torch.cat([contexts[:, -1:], drafts[:, :-1]], dim=1)
    assert torch.equal(combined_probs, r_table[prev])
    survival = torch.cumprod(path_acceptance(torch.softmax(draft_logits, -1), combined_probs, drafts).double(), -1)
    expected = exact_survival(q_table, r_table, last=2, gamma=gamma)
    for j in range(gamma):
        stderr = float(survival[:, j].std()) / rows ** 0.5
        assert abs(float(survival[:, j].mean()) - expected[j]) < 4 * stderr + 1e-9, (j, expected)
    metrics = drafted_metrics(survival.sum(dim=0), rows)
    assert metrics["accepted_length"] == pytest.approx(sum(expected), abs=0.02)
