"""The CoS rejection sampler on hand-made vLLM inputs (no engine): which logits rows it reads,
how the draft group's stash is matched against the drafts vLLM scheduled, and greedy outputs.

Batch of three requests, K = 2 draft slots: r0 has two drafts equal to the group's stash
(both accepted: argmax r, then T's proposal), r1 has two drafts of which vLLM's second differs
from the stash (the first is accepted; the second is unusable, so T's proposal takes its place,
pending the group's verification in the proposer), r2 has none (T's proposal only).  With 2 and
3 collaborators (draft groups of 1 and 2 models).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_cos.adapters.core import CoSCore
from vllm_cos.adapters.samplers import CoSRejectionSampler
from vllm_cos.adapters.stash import DraftStash
from vllm_cos.combine import build_combiner
from vllm_cos.config import load_config

VOCAB = 8


def _sampling(**controls):
    """A greedy batch's SamplingMetadata stand-in with no controls unless given."""
    fields = dict(temperature=None, top_k=None, top_p=None, generators={}, max_num_logprobs=None,
                  no_penalties=True, bad_words_token_ids=None, allowed_token_ids_mask=None,
                  logitsprocs=None, thinking_budget_state_holder=None, output_token_ids=[], spec_token_ids=None)
    fields.update(controls)
    temperature = fields["temperature"]  # vLLM's batch flags, as its input batch sets them
    fields.setdefault("all_greedy", temperature is None or bool((temperature <= 0).all()))
    fields.setdefault("all_random", temperature is not None and bool((temperature > 0).all()))
    return SimpleNamespace(**fields)


def _config(tiny_models, n: int):
    names = ["large", "medium", "small"][:n] if n == 3 else ["large", "small"]
    gamma = {"large": 1, "medium": 1, "small": 1 if n == 3 else 2}  # two drafts per step
    return load_config({"models": [{"name": m, "path": str(tiny_models[m]), "gamma": gamma[m]} for m in names],
                        "rule": {"name": "weighted_ensemble", "weights": [0.5] + [0.5 / (n - 1)] * (n - 1)},
                        "schedule": "alternate"})


@pytest.mark.parametrize("n", [2, 3])
def test_rows_stash_matching_and_greedy_outputs(tiny_models, n):
    cfg = _config(tiny_models, n)
    core = CoSCore(cfg, VOCAB)
    gen = torch.Generator().manual_seed(n)
    # vLLM's flat layout: r0 drafts at rows 0, 1, bonus 2; r1 drafts 3, 4, bonus 5; r2 bonus 6
    target_logits = torch.randn(7, VOCAB + 3, generator=gen)  # padded vocab, cropped by the sampler
    group_raw = torch.randn(3, 2, n - 1, VOCAB, generator=gen)  # [request, draft, member, vocab]
    combiner = build_combiner(cfg.rule, cfg.model_names)

    def argmax_r(target_row, request, slot):
        members = torch.cat([target_logits[target_row, :VOCAB].unsqueeze(0), group_raw[request, slot]])
        return int(combiner(members.unsqueeze(1))[0].argmax())

    r0 = [argmax_r(0, 0, 0), argmax_r(1, 0, 1)]
    r1_first = argmax_r(3, 1, 0)
    r1_stash = [r1_first, 1]
    r1_scheduled = [r1_first, 2]  # vLLM's second draft is not the group's
    core.stash = DraftStash(4, 2, n - 1, VOCAB)
    core.stash.put(["r0", "r1"], torch.tensor([r0, r1_stash]), group_raw[:2])

    metadata = SimpleNamespace(num_draft_tokens=[2, 2, 0], max_spec_len=2,
                               draft_token_ids=torch.tensor(r0 + r1_scheduled),
                               target_logits_indices=torch.tensor([0, 1, 3, 4]),
                               bonus_logits_indices=torch.tensor([2, 5, 6]))
    sampling = _sampling()
    runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=["r0", "r1", "r2"]))
    out = CoSRejectionSampler(None, core, runner)(metadata, None, target_logits, sampling)

    proposal = target_logits[:, :VOCAB].argmax(dim=-1)  # greedy: T's proposal is its argmax
    assert out.sampled_token_ids.tolist() == [
        r0 + [int(proposal[2])],
        [r1_first, int(proposal[4]), -1],
        [int(proposal[6]), -1, -1],
    ]
    pending = core.steps.current.proposals
    assert pending.rows.tolist() == [True, True, True]  # every row ends in a proposal of T
    assert pending.slot.tolist() == [2, 1, 0]
    assert torch.equal(pending.target_logits, target_logits[[2, 4, 6], :VOCAB])
    assert core.stats.drafts_proposed == 3 and core.stats.drafts_accepted == 3
    assert (core.stash.take(["r0", "r1"], 2)[0] < 0).all()  # read once


def test_a_rejected_draft_voids_the_proposal(tiny_models):
    """r0's first draft is not argmax r (greedy): the residual (argmax r) is emitted, T proposes nothing."""
    cfg = _config(tiny_models, 3)
    core = CoSCore(cfg, VOCAB)
    gen = torch.Generator().manual_seed(7)
    target_logits = torch.randn(2, VOCAB, generator=gen)
    group_raw = torch.randn(1, 2, VOCAB, generator=gen)  # [draft, member, vocab]
    combiner = build_combiner(cfg.rule, cfg.model_names)
    best = int(combiner(torch.cat([target_logits[:1], group_raw[0]]).unsqueeze(1))[0].argmax())
    wrong = (best + 1) % VOCAB
    core.stash = DraftStash(2, 1, 2, VOCAB)
    core.stash.put(["r0"], torch.tensor([[wrong]]), group_raw.unsqueeze(0))
    metadata = SimpleNamespace(num_draft_tokens=[1], max_spec_len=1, draft_token_ids=torch.tensor([wrong]),
                               target_logits_indices=torch.tensor([0]), bonus_logits_indices=torch.tensor([1]))
    sampling = _sampling()
    runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=["r0"]))
    out = CoSRejectionSampler(None, core, runner)(metadata, None, target_logits, sampling)
    assert out.sampled_token_ids.tolist() == [[best, -1]]
    assert core.steps.current.proposals.rows.tolist() == [False]
    assert core.stats.drafts_proposed == 1 and core.stats.drafts_accepted == 0


def test_a_seeded_row_emits_r_s_races_whatever_was_drafted(tiny_models):
    """Sampled (T = 1), seeded: whether vLLM scheduled r's race winners or other tokens as
    drafts, the emitted tokens are r's winners at output positions emitted + j (the request's
    third step: 5 tokens emitted before it), and T's proposal is its own race at the next one."""
    from vllm_cos.coupling import race, race_noise

    cfg = _config(tiny_models, 2)
    gen = torch.Generator().manual_seed(11)
    target_logits = torch.randn(3, VOCAB, generator=gen)
    group_raw = torch.randn(1, 2, 1, VOCAB, generator=gen)  # [request, draft, member, vocab]
    combiner = build_combiner(cfg.rule, cfg.model_names)
    r = torch.softmax(combiner(torch.stack([target_logits[:2], group_raw[0, :, 0]])), dim=-1)  # [2, V]
    noise = race_noise(torch.tensor([42, 42, 42]), torch.tensor([5, 6, 7]), VOCAB)
    winners = race(r, noise[:2]).tolist()
    proposal = int(race(torch.softmax(target_logits[2], -1).unsqueeze(0), noise[2:])[0])
    seeded = torch.Generator().manual_seed(42)
    runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=["r0"]),
                             requests={"r0": SimpleNamespace(output_token_ids=[1, 2, 3, 4, 5])})
    outputs = []
    for drafts in (winners, [(winners[0] + 1) % VOCAB, winners[1]], [winners[0], (winners[1] + 1) % VOCAB]):
        core = CoSCore(cfg, VOCAB)
        core.stash = DraftStash(2, 2, 1, VOCAB)
        core.stash.put(["r0"], torch.tensor([drafts]), group_raw)
        metadata = SimpleNamespace(num_draft_tokens=[2], max_spec_len=2, draft_token_ids=torch.tensor(drafts),
                                   target_logits_indices=torch.tensor([0, 1]), bonus_logits_indices=torch.tensor([2]))
        sampling = _sampling(temperature=torch.ones(1), generators={0: seeded})
        out = CoSRejectionSampler(None, core, runner)(metadata, None, target_logits, sampling)
        outputs.append(out.sampled_token_ids[0].tolist())
    assert outputs[0] == winners + [proposal]  # both accepted, then T's proposal at position 7
    assert outputs[1] == [winners[0], -1, -1]  # rejected at once: r's winner
    assert outputs[2] == [winners[0], winners[1], -1]


def test_lazily_scored_drafts_are_emitted_as_drafted_and_left_to_the_proposer(tiny_models):
    """Three models, plan [medium, small]: small's draft (draft 1) lacks medium's logits
    (lazy scoring: medium skipped the pass over draft 0), so only draft 0 is checked here; draft 1
    goes into the sampled tokens as drafted, T proposes after it, and both wait for the proposer."""
    cfg = _config(tiny_models, 3)
    core = CoSCore(cfg, VOCAB)
    assert core.plan == [0, 1] and core.complete_drafts(2) == 1
    gen = torch.Generator().manual_seed(5)
    target_logits = torch.randn(3, VOCAB, generator=gen)
    group_raw = torch.randn(1, 2, 2, VOCAB, generator=gen)  # [request, draft, member, vocab]
    combiner = build_combiner(cfg.rule, cfg.model_names)
    first = int(combiner(torch.cat([target_logits[:1], group_raw[0, 0]]).unsqueeze(1))[0].argmax())
    anything = (first + 3) % VOCAB
    core.stash = DraftStash(2, 2, 2, VOCAB)
    core.stash.put(["r0"], torch.tensor([[first, anything]]), group_raw, complete=core.complete_drafts(2))
    metadata = SimpleNamespace(num_draft_tokens=[2], max_spec_len=2, draft_token_ids=torch.tensor([first, anything]),
                               target_logits_indices=torch.tensor([0, 1]), bonus_logits_indices=torch.tensor([2]))
    runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=["r0"]))
    out = CoSRejectionSampler(None, core, runner)(metadata, None, target_logits, _sampling())
    assert out.sampled_token_ids.tolist() == [[first, anything, int(target_logits[2].argmax())]]
    proposals = core.steps.current.proposals
    assert proposals.slot.tolist() == [2] and proposals.pending.count.tolist() == [1]
    assert torch.equal(proposals.pending.target_logits[0, 0], target_logits[1])
    drafted_from = group_raw[0, 1, 1].argmax()  # small's own (greedy) q at draft 1
    assert int(proposals.pending.proposal_probs[0, 0].argmax()) == int(drafted_from)
    assert core.stats.drafts_proposed == 1 and core.stats.drafts_accepted == 1  # the rest: the proposer's


def test_an_all_greedy_batch_takes_the_argmax_of_its_one_hot_rows():
    from vllm_cos.adapters.controls import RowSampling

    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(3))
    greedy = RowSampling(_sampling(), 4, "cpu")  # temperature None: vLLM's all_greedy flag
    probs = greedy.probs(logits)
    offset = torch.zeros(4, dtype=torch.long)
    assert greedy.sample(probs, offset).tolist() == logits.argmax(-1).tolist()
    seeded = RowSampling(_sampling(generators={1: torch.Generator().manual_seed(5)}), 4, "cpu", emitted=[0] * 4)
    assert seeded.sample(seeded.probs(logits), offset).tolist() == logits.argmax(-1).tolist()
    # rows that are not r's (a raw proposal q): sampled, not maximised
    flat = torch.full((4, VOCAB), 1.0 / VOCAB)
    draws = {tuple(greedy.sample(flat, offset, one_hot_if_greedy=False).tolist()) for _ in range(20)}
    assert len(draws) > 1
