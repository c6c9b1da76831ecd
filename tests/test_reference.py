"""The reference decoder: exactness of every schedule, greedy identity, edge cases.

Fast tests use :class:`fakes.TableLM` (random next-token tables); the statistical tier
(``-m stat``) draws 100k two-token continuations per configuration.
"""

import itertools

import pytest
import torch

from fakes import TableLM
from stats import P_THRESHOLD, chi2_pvalue
from vllm_cos.combine import build_combiner
from vllm_cos.config import CoSConfig, ModelSpec, RuleSpec
from vllm_cos.reference import ReferenceDecoder, SamplingSpec
from vllm_cos.sampling import apply_sampling_params
from vllm_cos.schedule import Schedule

VOCAB = 10
PROMPT = [3, 4]
NAMES = ("a", "b", "c")


def _geometric_mean(member_probs):
    return member_probs.clamp_min(1e-30).log().mean(0).exp()


def make_config(rule: str, num_models: int, schedule: str, gammas=None, proposer="b") -> CoSConfig:
    names = NAMES[:num_models]
    gammas = gammas or (2, 3, 1)[:num_models]
    models = tuple(ModelSpec(n, f"/fake/{n}", g) for n, g in zip(names, gammas))
    rules = {
        "we": RuleSpec("weighted_ensemble", weights=dict(zip(names, [0.3, 0.7] if num_models == 2 else [1 / 3] * 3))),
        "cd": RuleSpec("contrastive", expert="a", amateur="b", mu=0.3),
        "custom": RuleSpec("custom", function="test_reference:_geometric_mean", inputs="probs"),
    }
    return CoSConfig(models=models, rule=rules[rule], target="a", schedule=schedule, proposer=proposer)


def table_models(num_models, scale=2.0):
    return [TableLM(VOCAB, seed, scale) for seed in (11, 12, 13)[:num_models]]


def exact_two_token_distribution(config, models, temperature):
    """P(x1, x2) under r, computed directly from the models: [vocab, vocab]."""
    combiner = build_combiner(config.rule, config.model_names)
    t = torch.tensor([temperature])

    def r_after(tokens):
        member_logits = torch.stack([m.logits_after(tokens) for m in models]).unsqueeze(1)
        return apply_sampling_params(combiner(member_logits), t)[0]

    first = r_after(PROMPT)
    second = torch.stack([r_after(PROMPT + [x]) for x in range(VOCAB)])
    return first.unsqueeze(1) * second  # [x1, x2]


CASES = list(itertools.product(["we2", "we3", "cd", "custom"], ["naive", "alternate"]))


def _case(rule_name, schedule):
    """gamma 1 for every model: with two tokens, alternate's second token is then the
    verifier's bonus (proposed from its own p and checked by the proposer), while naive
    samples that position from r directly, so the two schedules take different paths."""
    rule, n = {"we2": ("we", 2), "we3": ("we", 3), "cd": ("cd", 2), "custom": ("custom", 2)}[rule_name]
    return make_config(rule, n, schedule, gammas=(1, 1, 1)[:n]), table_models(n)


def _two_token_counts(decoder, num_samples, temperature):
    torch.manual_seed(2025)
    outputs = decoder.generate([PROMPT] * num_samples, SamplingSpec(max_tokens=2, temperature=temperature))
    pairs = torch.tensor([o.token_ids for o in outputs])  # [samples, 2]
    return torch.bincount(pairs[:, 0] * VOCAB + pairs[:, 1], minlength=VOCAB * VOCAB).view(VOCAB, VOCAB)


@pytest.mark.parametrize("rule_name, schedule", CASES)
def test_two_token_distribution_quick(rule_name, schedule):
    """A fast version of the statistical test below (3k samples)."""
    config, models = _case(rule_name, schedule)
    counts = _two_token_counts(ReferenceDecoder(config, models), 3000, 1.0)
    expected = exact_two_token_distribution(config, models, 1.0)
    assert chi2_pvalue(counts.sum(1), expected.sum(1)) > P_THRESHOLD
    assert chi2_pvalue(counts, expected) > P_THRESHOLD


@pytest.mark.stat
@pytest.mark.parametrize("rule_name, schedule", CASES)
def test_two_token_distribution_matches_r(rule_name, schedule):
    """100k seeded runs of the reference decoder: the first token and the first two tokens
    are distributed as r (χ²), for WE with 2 and 3 models, CD and a custom rule."""
    config, models = _case(rule_name, schedule)
    decoder = ReferenceDecoder(config, models)
    counts = _two_token_counts(decoder, 100_000, 1.0)
    expected = exact_two_token_distribution(config, models, 1.0)
    p_first = chi2_pvalue(counts.sum(1), expected.sum(1))
    p_pair = chi2_pvalue(counts, expected)
    print(f"{rule_name}/{schedule}: first-token p={p_first:.3g}, two-token p={p_pair:.3g}")
    assert p_first > P_THRESHOLD and p_pair > P_THRESHOLD


def test_tempered_with_top_k_top_p_alternate():
    config, models = make_config("we", 2, "alternate"), table_models(2)
    torch.manual_seed(5)
    spec = SamplingSpec(max_tokens=1, temperature=0.7, top_k=5, top_p=0.9)
    outputs = ReferenceDecoder(config, models).generate([PROMPT] * 5000, spec)
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in outputs]), minlength=VOCAB)
    combiner = build_combiner(config.rule, config.model_names)
    member_logits = torch.stack([m.logits_after(PROMPT) for m in models]).unsqueeze(1)
    r = apply_sampling_params(combiner(member_logits), torch.tensor([0.7]), torch.tensor([5]), torch.tensor([0.9]))[0]
    assert counts[r == 0].sum() == 0
    assert chi2_pvalue(counts, r) > P_THRESHOLD


# ------------------------------------------------------------------------- greedy identity

def _prompts(count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(count)]


@pytest.mark.parametrize("rule", ["we", "cd"])
@pytest.mark.parametrize("num_models", [2, 3])
def test_greedy_identity_on_table_models(rule, num_models):
    models = table_models(num_models)
    prompts = _prompts(24)
    spec = SamplingSpec(max_tokens=20)
    standard = ReferenceDecoder(make_config(rule, num_models, "standard"), models).generate(prompts, spec)
    for schedule in ("naive", "alternate"):
        cos = ReferenceDecoder(make_config(rule, num_models, schedule), models).generate(prompts, spec)
        assert [o.token_ids for o in cos] == [o.token_ids for o in standard], schedule
    # standard decoding costs one forward of every model per token
    assert standard[0].stats.forwards == [20] * num_models


def test_cos_saves_forwards_of_the_expensive_model():
    models = table_models(2, scale=0.5)  # flat distributions: models agree often
    prompts = _prompts(8)
    spec = SamplingSpec(max_tokens=30)
    cfg = make_config("we", 2, "naive", gammas=(1, 4))
    outputs = ReferenceDecoder(cfg, models).generate(prompts, spec)
    target_forwards = sum(o.stats.forwards[0] for o in outputs)
    assert target_forwards < 0.8 * 30 * len(prompts)
    assert all(len(o.token_ids) == 30 for o in outputs)


# ------------------------------------------------------------------------- degenerate cases

def test_all_weight_on_one_model_reproduces_it():
    models = table_models(2)
    cfg = CoSConfig(models=(ModelSpec("a", "/a", 2), ModelSpec("b", "/b", 3)),
                    rule=RuleSpec("weighted_ensemble", weights={"a": 1.0, "b": 0.0}),
                    target="a", schedule="alternate", proposer="b")
    decoder = ReferenceDecoder(cfg, models)
    # greedy: the model's own greedy continuation
    out = decoder.generate([PROMPT], SamplingSpec(max_tokens=12))[0].token_ids
    tokens = list(PROMPT)
    for _ in range(12):
        tokens.append(int(models[0].logits_after(tokens).argmax()))
    assert out == tokens[len(PROMPT):]
    # sampling: the model's own distribution
    torch.manual_seed(9)
    outs = decoder.generate([PROMPT] * 5000, SamplingSpec(max_tokens=1, temperature=1.0))
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=VOCAB)
    assert chi2_pvalue(counts, torch.softmax(models[0].logits_after(PROMPT), -1)) > P_THRESHOLD


def test_eos_inside_an_accepted_run_stops_there():
    models = table_models(2)
    cfg = make_config("we", 2, "naive", gammas=(1, 5))
    decoder = ReferenceDecoder(cfg, models)
    full = decoder.generate([PROMPT], SamplingSpec(max_tokens=20))[0].token_ids
    eos = full[6]
    first = full.index(eos)
    stopped = decoder.generate([PROMPT], SamplingSpec(max_tokens=20), eos_token_id=eos)[0].token_ids
    assert stopped == full[: first + 1]


def test_same_seed_same_text_and_max_tokens():
    models = table_models(3)
    decoder = ReferenceDecoder(make_config("we", 3, "alternate"), models)
    specs = [SamplingSpec(max_tokens=m, temperature=1.0, seed=s) for m, s in [(15, 1), (7, 1), (15, 2), (15, 1)]]
    outs = [o.token_ids for o in decoder.generate([PROMPT] * 4, specs)]
    assert outs[0] == outs[3]
    assert len(outs[1]) == 7 and len(outs[0]) == 15
    assert outs[0] != outs[2]
    alone = decoder.generate([PROMPT], specs[0])[0].token_ids
    assert alone == outs[0]  # a seeded request does not depend on its batch


def test_schedules_are_data():
    assert Schedule.standard(3) == Schedule(order=(0, 1, 2), gammas=(0, 0, 0))
    assert Schedule.naive(3, proposer=2, gamma=4) == Schedule(order=(2, 0, 1), gammas=(0, 0, 4))
    assert Schedule.alternate((1, 2, 1), first=1) == Schedule(order=(1, 2, 0), gammas=(1, 2, 1))


def test_alternate_emits_more_than_one_token_per_target_forward():
    models = table_models(2, scale=0.3)
    outputs = ReferenceDecoder(make_config("we", 2, "alternate", gammas=(1, 4)), models).generate(
        _prompts(6), SamplingSpec(max_tokens=40, temperature=1.0, seed=3))
    emitted = sum(o.stats.emitted for o in outputs)
    target_forwards = sum(o.stats.forwards[0] for o in outputs)
    assert emitted > 1.3 * target_forwards
    assert all(0 < o.stats.acceptance_rate <= 1 for o in outputs)
