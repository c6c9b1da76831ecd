import pytest
import torch

from stats import P_THRESHOLD, chi2_pvalue
from vllm_cos.combine import contrastive, weighted_ensemble
from vllm_cos.sampling import apply_sampling_params
from vllm_cos.verify import PLACEHOLDER, verify

VOCAB = 12
SAMPLES = 100_000


def _dist(seed, vocab=VOCAB, scale=1.5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=gen) * scale  # logits [vocab]


def _custom_geometric_mean(member_probs):  # used as a "custom rule" on probabilities
    return member_probs.clamp_min(1e-30).log().mean(0).exp()


RULES = {
    "we2": lambda logits: weighted_ensemble(logits[:2], torch.tensor([0.3, 0.7])),
    "we3": lambda logits: weighted_ensemble(logits, torch.tensor([1 / 3, 1 / 3, 1 / 3])),
    "cd": lambda logits: contrastive(logits[:2], expert=0, amateur=1, mu=0.3),
    "custom": lambda logits: _custom_geometric_mean(torch.softmax(logits[:2], -1)).log(),
}


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_first_token_matches_r(rule, temperature):
    """100k rows, each drafting one token from q (the proposer's tempered p): the emitted
    token is distributed as tempered r."""
    torch.manual_seed(1234)
    member_logits = torch.stack([_dist(1), _dist(2), _dist(3)]).unsqueeze(1)  # [3, 1, vocab]
    t = torch.tensor([temperature])
    r = apply_sampling_params(RULES[rule](member_logits), t)[0]  # [vocab]
    q = apply_sampling_params(member_logits[1], t)[0]  # proposer = model 1
    drafts = torch.multinomial(q, SAMPLES, replacement=True).unsqueeze(1)  # [samples, 1]
    out = verify(drafts, torch.ones(SAMPLES, dtype=torch.long),
                 q.expand(SAMPLES, 1, VOCAB), r.expand(SAMPLES, 2, VOCAB),
                 has_final=torch.zeros(SAMPLES, dtype=torch.bool))
    assert (out.num_emitted == 1).all()
    counts = torch.bincount(out.token_ids[:, 0], minlength=VOCAB)
    assert chi2_pvalue(counts, r) > P_THRESHOLD
    # total variation of the empirical distribution is small as well
    assert 0.5 * (counts / SAMPLES - r).abs().sum() < 0.01
    # and some drafts really were rejected (otherwise the test would prove little)
    assert 0.05 < out.rejected.float().mean() < 0.95


def test_multi_draft_positions_and_final_token():
    """Three drafts per row (position-dependent q and r); every emitted position is
    distributed as r, including the final token drawn when all drafts are accepted."""
    torch.manual_seed(7)
    K = 3
    q = torch.softmax(torch.stack([_dist(10 + i) for i in range(K + 1)]), -1)  # [K+1, vocab]
    r = torch.softmax(torch.stack([_dist(20 + i) for i in range(K + 1)]) * 0.5 + torch.stack(
        [_dist(10 + i) for i in range(K + 1)]) * 0.5, -1)
    drafts = torch.stack([torch.multinomial(q[i], SAMPLES, replacement=True) for i in range(K)], 1)
    out = verify(drafts, torch.full((SAMPLES,), K), q[:K].expand(SAMPLES, K, VOCAB),
                 r.expand(SAMPLES, K + 1, VOCAB), has_final=torch.ones(SAMPLES, dtype=torch.bool))
    # q and r are position-wise independent of the prefix, so each position's marginal,
    # among rows that reached it, is r at that position.
    for pos in range(K + 1):
        reached = out.num_emitted > pos
        tokens = out.token_ids[reached, pos]
        assert (tokens >= 0).all()
        counts = torch.bincount(tokens, minlength=VOCAB)
        assert chi2_pvalue(counts, r[pos]) > P_THRESHOLD, pos
    assert (out.num_emitted == out.num_accepted + 1).all()


def test_greedy_accepts_iff_argmax():
    r = torch.softmax(_dist(5), -1)
    best = int(r.argmax())
    other = (best + 1) % VOCAB
    one_hot_r = apply_sampling_params(r.log().unsqueeze(0), torch.tensor([0.0]))[0]
    q_best = torch.zeros(VOCAB).index_fill_(0, torch.tensor([best]), 1.0)
    q_other = torch.zeros(VOCAB).index_fill_(0, torch.tensor([other]), 1.0)
    drafts = torch.tensor([[best, other], [other, best]])
    out = verify(drafts, torch.tensor([2, 2]),
                 torch.stack([torch.stack([q_best, q_other]), torch.stack([q_other, q_best])]),
                 one_hot_r.expand(2, 3, VOCAB), has_final=torch.tensor([True, True]))
    assert out.token_ids.tolist() == [[best, best, PLACEHOLDER], [best, PLACEHOLDER, PLACEHOLDER]]
    assert out.num_accepted.tolist() == [1, 0]
    assert out.rejected.tolist() == [True, True]


def _peaked(token, vocab=VOCAB):
    return torch.full((vocab,), 1e-6).index_fill_(0, torch.tensor([token]), 1.0)


def test_edge_cases_in_one_batch():
    """Rows: all accepted with a final token; all accepted without one; first rejected;
    empty draft with a final token; empty draft without one."""
    V = VOCAB
    r = torch.stack([_peaked(i % V) for i in range(4)])  # r puts (almost) all mass on token pos
    q_match = r.clone()  # proposer agrees with r
    q_wrong = torch.stack([_peaked((i + 5) % V) for i in range(4)])
    draft_ids = torch.tensor([[0, 1, 2], [0, 1, 2], [5, 6, 7], [0, 0, 0], [0, 0, 0]])
    num_drafts = torch.tensor([3, 3, 3, 0, 0])
    proposal = torch.stack([q_match[:3], q_match[:3], q_wrong[:3], q_match[:3], q_match[:3]])
    target = r.expand(5, 4, V)
    has_final = torch.tensor([True, False, True, True, False])
    gens = [torch.Generator().manual_seed(i) for i in range(5)]
    out = verify(draft_ids, num_drafts, proposal, target, has_final, gens)
    assert out.token_ids.tolist() == [
        [0, 1, 2, 3],
        [0, 1, 2, -1],
        [0, -1, -1, -1],  # rejected at 0, recovered from norm(max(0, r - q)) -> token 0
        [0, -1, -1, -1],  # nothing to verify, final token sampled from r at position 0
        [-1, -1, -1, -1],
    ]
    assert out.num_emitted.tolist() == [4, 3, 1, 1, 0]
    assert out.num_accepted.tolist() == [3, 3, 0, 0, 0]
    assert out.rejected.tolist() == [False, False, True, False, False]


def test_identical_distributions_accept_everything():
    torch.manual_seed(3)
    p = torch.softmax(torch.stack([_dist(i) for i in range(4)]), -1)  # [4, vocab]
    B = 2000
    drafts = torch.stack([torch.multinomial(p[i], B, replacement=True) for i in range(3)], 1)
    out = verify(drafts, torch.full((B,), 3), p[:3].expand(B, 3, VOCAB), p.expand(B, 4, VOCAB),
                 has_final=torch.ones(B, dtype=torch.bool))
    assert (out.num_accepted == 3).all() and not out.rejected.any()


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    q = torch.softmax(torch.stack([_dist(i) for i in range(3)]), -1)
    r = torch.softmax(torch.stack([_dist(10 + i) for i in range(4)]), -1)
    drafts = torch.tensor([[1, 2, 3]])

    def run(batch_size, seed_row_first):
        gens = [torch.Generator().manual_seed(42)] + [None] * (batch_size - 1)
        if not seed_row_first:
            gens = gens[::-1]
        out = verify(drafts.expand(batch_size, 3), torch.full((batch_size,), 3),
                     q.expand(batch_size, 3, VOCAB), r.expand(batch_size, 4, VOCAB),
                     torch.ones(batch_size, dtype=torch.bool), gens)
        row = 0 if seed_row_first else batch_size - 1
        return out.token_ids[row].tolist()

    results = {tuple(run(b, first)) for b in (1, 3, 8) for first in (True, False)}
    assert len(results) == 1
    # different seeds do give different streams somewhere
    outs = set()
    for seed in range(20):
        out = verify(drafts, torch.tensor([3]), q.unsqueeze(0), r.unsqueeze(0), torch.tensor([True]),
                     [torch.Generator().manual_seed(seed)])
        outs.add(tuple(out.token_ids[0].tolist()))
    assert len(outs) > 1


def test_a_seeded_row_with_nothing_to_verify_draws_nothing():
    """A prefill row inside a batch with drafts (max_drafts > 0, its num_drafts 0, no final
    position) must leave its generator as it would be outside that batch."""
    q = torch.softmax(torch.stack([_dist(i) for i in range(2)]), -1).expand(2, 2, VOCAB)
    r = torch.softmax(torch.stack([_dist(10 + i) for i in range(3)]), -1).expand(2, 3, VOCAB)
    idle, busy = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    before_idle, before_busy = idle.get_state().clone(), busy.get_state().clone()
    out = verify(torch.tensor([[0, 0], [1, 2]]), torch.tensor([0, 2]), q, r,
                 torch.zeros(2, dtype=torch.bool), [idle, busy])
    assert out.num_emitted[0] == 0
    assert torch.equal(idle.get_state(), before_idle)
    assert not torch.equal(busy.get_state(), before_busy)  # a row with drafts does draw
