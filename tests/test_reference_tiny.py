"""The reference decoder on the tiny transformers models (real KV caches)."""

import itertools

import pytest
import torch

from fakes import MemoizedLM
from stats import P_THRESHOLD, chi2_pvalue
from vllm_cos.combine import build_combiner
from vllm_cos.config import load_config
from vllm_cos.reference import CausalLM, ReferenceDecoder, SamplingSpec, generate
from vllm_cos.sampling import apply_sampling_params

TEXTS = [
    "def ", "import ", "class ", "for i in range(", "return ", "if x is None:\n    ", "self.",
    "while True:\n    ", "print(", "from collections import ", "try:\n    ", "with open(", "x = [",
    "def __init__(self", "raise ValueError(", "# ", "elif ", "lambda x: ", "yield ", "assert ",
    "async def ", "except Exception as e:\n    ",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["large"])


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def lms(tiny_models):
    return {name: CausalLM.from_pretrained(str(path)) for name, path in tiny_models.items()}


def tiny_config(tiny_models, rule, names, schedule, gammas=None):
    gammas = gammas or {"large": 1, "medium": 2, "small": 3}
    raw = {
        "models": [{"name": n, "path": str(tiny_models[n]), "gamma": gammas[n]} for n in names],
        "target": "large",
        "schedule": schedule,
        "proposer": names[-1],
        "rule": {
            "we": {"name": "weighted_ensemble", "weights": {n: 1 / len(names) for n in names}},
            "cd": {"name": "contrastive", "expert": "large", "amateur": names[-1], "mu": 0.1},
            "custom": {"name": "custom", "function": "vllm_cos.rules:geometric_mean", "inputs": "probs"},
        }[rule],
    }
    return load_config(raw)


MODEL_SETS = {2: ("large", "small"), 3: ("large", "medium", "small")}


@pytest.mark.parametrize("rule, num_models", itertools.product(["we", "cd"], [2, 3]))
def test_greedy_cos_matches_standard(tiny_models, lms, prompts, tokenizer, rule, num_models):
    names = MODEL_SETS[num_models]
    models = [lms[n] for n in names]
    spec = SamplingSpec(max_tokens=16)
    standard = ReferenceDecoder(tiny_config(tiny_models, rule, names, "standard"), models).generate(
        prompts, spec, tokenizer.eos_token_id)
    expected = [o.token_ids for o in standard]
    assert len(prompts) >= 20 and all(len(t) > 0 for t in expected)
    for schedule in ("naive", "alternate"):
        cos = ReferenceDecoder(tiny_config(tiny_models, rule, names, schedule), models).generate(
            prompts, spec, tokenizer.eos_token_id)
        assert [o.token_ids for o in cos] == expected, schedule
        assert sum(o.stats.forwards[0] for o in cos) < sum(o.stats.forwards[0] for o in standard)


def test_generate_function_and_model_loading(tiny_models, prompts):
    config = tiny_config(tiny_models, "we", ("large", "small"), "alternate")
    a = generate(config, prompts[:3], max_tokens=8)
    b = generate(config, prompts[:3], max_tokens=8, temperature=1.0, seed=5)
    c = generate(config, prompts[:3], max_tokens=8, temperature=1.0, seed=5)
    assert b == c and all(len(x) == 8 for x in a)


def _first_two_token_test(tiny_models, lms, prompt, rule, names, schedule, samples):
    # gamma 1 everywhere: alternate's second token is then a verified bonus (see test_reference._case)
    config = tiny_config(tiny_models, rule, names, schedule, gammas={"large": 1, "medium": 1, "small": 1})
    memo = [MemoizedLM(lms[n]) for n in names]
    decoder = ReferenceDecoder(config, memo)
    torch.manual_seed(11)
    outputs = decoder.generate([prompt] * samples, SamplingSpec(max_tokens=2, temperature=1.0))
    pairs = torch.tensor([o.token_ids for o in outputs])  # [samples, 2]
    combiner = build_combiner(config.rule, config.model_names)
    vocab = decoder.vocab_size

    def r_after(tokens):
        member_logits = torch.stack([m.logits_after(tokens)[:vocab] for m in memo]).unsqueeze(1)
        return apply_sampling_params(combiner(member_logits), torch.tensor([1.0]))[0]

    first_r = r_after(prompt)
    first_counts = torch.bincount(pairs[:, 0], minlength=vocab)
    p_first = chi2_pvalue(first_counts, first_r)
    # joint of the two tokens over the first tokens that were observed
    observed_first = first_counts.nonzero().flatten().tolist()
    pair_probs = torch.cat([first_r[x] * r_after(prompt + [x]) for x in observed_first])
    index = {x: i for i, x in enumerate(observed_first)}
    pair_keys = torch.tensor([index[int(x)] for x in pairs[:, 0]]) * vocab + pairs[:, 1]
    pair_counts = torch.bincount(pair_keys, minlength=len(observed_first) * vocab)
    p_pair = chi2_pvalue(pair_counts, pair_probs)
    return p_first, p_pair


TINY_CASES = [("we", ("large", "small")), ("we", ("large", "medium", "small")), ("cd", ("large", "small")),
              ("custom", ("large", "small"))]


@pytest.mark.parametrize("schedule", ["naive", "alternate"])
def test_first_tokens_match_r_quick(tiny_models, lms, prompts, schedule):
    p_first, p_pair = _first_two_token_test(tiny_models, lms, prompts[0], "we", ("large", "small"), schedule, 4000)
    assert p_first > P_THRESHOLD and p_pair > P_THRESHOLD


@pytest.mark.stat
@pytest.mark.parametrize("schedule", ["naive", "alternate"])
@pytest.mark.parametrize("rule, names", TINY_CASES)
def test_first_tokens_match_r_on_tiny_models(tiny_models, lms, prompts, rule, names, schedule):
    p_first, p_pair = _first_two_token_test(tiny_models, lms, prompts[0], rule, names, schedule, 100_000)
    print(f"tiny {rule}/{len(names)} models/{schedule}: first-token p={p_first:.3g}, two-token p={p_pair:.3g}")
    assert p_first > P_THRESHOLD and p_pair > P_THRESHOLD
