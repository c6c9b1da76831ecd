"""vllm_cos.mixture: mixture sampling (model index k ~ w, then the token from p_k) for a weighted
ensemble at T = 1, and its per-request fallback to standard collaborative decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine_helpers import PROMPT_FOR_SAMPLING, r_next, r_second_token
from fakes import MemoizedLM
from stats import P_THRESHOLD, chi2_pvalue
from test_layering import imported_modules
from vllm_cos.config import load_config
from vllm_cos.mixture import MixtureDecoder, is_exact_spec, mixture_sample, mixture_weights
from vllm_cos.reference import CausalLM, ReferenceDecoder, SamplingSpec
from vllm_cos.schedule import Schedule

W_LARGE = 0.7
TEXTS = ["def ", "import ", "class ", "for i in range(", "return ", "self.", "print(", "x = ["]


def tiny_config(tiny_models, rule="we", w_large=W_LARGE):
    rules = {"we": {"name": "weighted_ensemble", "weights": {"large": w_large, "small": 1 - w_large}},
             "cd": {"name": "contrastive", "expert": "large", "amateur": "small", "mu": 0.1}}
    return load_config({"models": [{"name": "large", "path": str(tiny_models["large"])},
                                   {"name": "small", "path": str(tiny_models["small"])}],
                        "rule": rules[rule], "schedule": "standard"})


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["large"])


@pytest.fixture(scope="module")
def lms(tiny_models):
    return [CausalLM.from_pretrained(str(tiny_models[name])) for name in ("large", "small")]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode(t) for t in TEXTS]


# ------------------------------------------------------------------ (a) the sampling step, pure

def test_index_then_token_is_exact_for_the_mixture():
    gen = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    member = torch.softmax(torch.randn(3, 12, generator=gen) * 2, dim=-1)
    member[0, 3] = member[1, 3] = member[2, 3] = 0.0  # a token no model can emit
    rows = 200_000
    uniforms = torch.rand(rows, 2, dtype=torch.float64, generator=gen)
    calls = []

    def member_probs(picked):
        calls.append(picked)
        return member[torch.tensor(picked)]

    picked, tokens = mixture_sample(weights, uniforms, member_probs)
    assert len(calls) == 1 and calls[0] == picked and tokens.shape == (rows,)
    mixture = (weights.unsqueeze(1) * member.double()).sum(0)
    assert int((tokens == 3).sum()) == 0
    assert chi2_pvalue(np.bincount(tokens.numpy(), minlength=12), mixture.numpy()) > P_THRESHOLD
    assert chi2_pvalue(np.bincount(picked, minlength=3), weights.numpy()) > P_THRESHOLD


def test_zero_weight_model_is_never_picked():
    uniforms = torch.rand(10_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    picked, _ = mixture_sample(torch.tensor([0.0, 1.0, 0.0]), uniforms,
                               lambda ks: torch.full((len(ks), 4), 0.25))
    assert set(picked) == {1}


def test_exact_only_for_we_at_temperature_one_without_truncation(tiny_models):
    assert is_exact_spec(SamplingSpec(temperature=1.0), 100)
    assert is_exact_spec(SamplingSpec(temperature=1.0, top_k=100), 100)  # top-k >= vocab: disabled
    for spec in (SamplingSpec(temperature=0.0), SamplingSpec(temperature=0.7), SamplingSpec(temperature=1.0, top_k=5),
                 SamplingSpec(temperature=1.0, top_p=0.9)):
        assert not is_exact_spec(spec, 100)
    assert mixture_weights(tiny_config(tiny_models)).tolist() == pytest.approx([W_LARGE, 1 - W_LARGE])
    assert mixture_weights(tiny_config(tiny_models, "cd")) is None


def test_module_imports_no_vllm():
    path = Path(__file__).resolve().parents[1] / "vllm_cos" / "mixture.py"
    assert not {m for m in imported_modules(path) if m.split(".")[0] == "vllm"}
    assert len(path.read_text().splitlines()) < 200


# ------------------------------------------------------------------ (b) the first two tokens vs r

def test_first_two_tokens_follow_r(tiny_models, lms, tokenizer):
    cfg = tiny_config(tiny_models)
    prompt = tokenizer.encode(PROMPT_FOR_SAMPLING)
    n = 3000
    decoder = MixtureDecoder(cfg, [MemoizedLM(lm) for lm in lms])  # each distinct prefix forwarded once
    outs = decoder.generate([prompt] * n, [SamplingSpec(max_tokens=2, temperature=1.0, seed=i) for i in range(n)])
    tokens = np.array([o.token_ids for o in outs])  # [n, 2]
    assert tokens.shape == (n, 2)
    vocab = decoder.vocab_size
    first, second = r_next(cfg, prompt)[:vocab], r_second_token(cfg, prompt)[:vocab]
    assert chi2_pvalue(np.bincount(tokens[:, 0], minlength=vocab), first.numpy()) > P_THRESHOLD
    assert chi2_pvalue(np.bincount(tokens[:, 1], minlength=vocab), second.numpy()) > P_THRESHOLD
    large = sum(o.stats.forwards[0] for o in outs)
    assert abs(large / (2 * n) - W_LARGE) < 4 * (W_LARGE * (1 - W_LARGE) / (2 * n)) ** 0.5


@pytest.fixture(scope="module")
def sampled(tiny_models, lms, prompts):
    """Mixture-sampled continuations through real KV caches: (specs, outputs)."""
    specs = [SamplingSpec(max_tokens=16, temperature=1.0, seed=100 + i) for i in range(len(prompts))]
    return specs, MixtureDecoder(tiny_config(tiny_models), lms).generate(prompts, specs)


def test_kv_cache_catch_up_matches_full_prefix_forwards(tiny_models, lms, prompts, sampled):
    """Real KV caches extended by several tokens at once give the tokens full-prefix forwards give."""
    specs, cached = sampled
    memo = MixtureDecoder(tiny_config(tiny_models), [MemoizedLM(lm) for lm in lms]).generate(prompts[:4], specs[:4])
    assert [o.token_ids for o in cached[:4]] == [o.token_ids for o in memo]


# ------------------------------------------------------------------ (c) forwards

def test_large_model_runs_on_about_its_weight_of_the_tokens(sampled):
    """Through real KV caches here (loose: 128 tokens); (b) checks it on 6000 tokens."""
    specs, outs = sampled
    emitted = sum(o.stats.emitted for o in outs)
    assert emitted == 16 * len(specs) and all(len(o.token_ids) == 16 for o in outs)
    assert all(sum(o.stats.forwards) == o.stats.emitted for o in outs)  # one model run per token
    large = sum(o.stats.forwards[0] for o in outs)
    assert abs(large / emitted - W_LARGE) < 4 * (W_LARGE * (1 - W_LARGE) / emitted) ** 0.5
    assert outs[0].stats.seconds > 0


# ------------------------------------------------------------------ (d) fallback rows

def test_fallback_rows_equal_reference_standard(tiny_models, lms, prompts, tokenizer):
    cfg = tiny_config(tiny_models)
    standard = ReferenceDecoder(cfg, lms, Schedule.standard(2))
    specs = []
    for i in range(len(prompts)):
        specs.append([SamplingSpec(max_tokens=8, temperature=1.0, seed=i),  # exact: mixture sampling
                      SamplingSpec(max_tokens=8, temperature=0.0, seed=i),
                      SamplingSpec(max_tokens=8, temperature=0.7, seed=i),
                      SamplingSpec(max_tokens=8, temperature=1.0, top_k=5, seed=i),
                      SamplingSpec(max_tokens=8, temperature=1.0, top_p=0.9, seed=i)][i % 5])
    eos = tokenizer.eos_token_id
    outs = MixtureDecoder(cfg, lms).generate(prompts, specs, eos)
    expected = standard.generate(prompts, specs, eos)
    for i, (out, ref) in enumerate(zip(outs, expected)):
        if i % 5:
            assert out.token_ids == ref.token_ids, specs[i]
            assert out.stats.forwards == ref.stats.forwards
        else:
            assert sum(out.stats.forwards) == len(out.token_ids)
    cd = tiny_config(tiny_models, "cd")
    t1 = [SamplingSpec(max_tokens=8, temperature=1.0, seed=i) for i in range(3)]
    assert [o.token_ids for o in MixtureDecoder(cd, lms).generate(prompts[:3], t1)] == \
        [o.token_ids for o in ReferenceDecoder(cd, lms, Schedule.standard(2)).generate(prompts[:3], t1)]


# ------------------------------------------------------------------ (e) seeded reproducibility

def test_seeded_requests_reproducible_across_batches(tiny_models, lms, prompts):
    decoder = MixtureDecoder(tiny_config(tiny_models), lms)
    a = SamplingSpec(max_tokens=12, temperature=1.0, seed=7)
    b = SamplingSpec(max_tokens=5, temperature=1.0, seed=8)
    greedy = SamplingSpec(max_tokens=6, temperature=0.0)
    unseeded = SamplingSpec(max_tokens=9, temperature=1.0)
    alone = decoder.generate([prompts[0]], [a])[0].token_ids
    batch = decoder.generate([prompts[1], prompts[0], prompts[2]], [b, a, greedy])
    other = decoder.generate([prompts[3], prompts[2], prompts[0], prompts[1]], [unseeded, greedy, a, b])
    assert len(alone) == 12
    assert batch[1].token_ids == alone and other[2].token_ids == alone
    assert batch[0].token_ids == other[3].token_ids and batch[2].token_ids == other[1].token_ids
    assert decoder.generate([prompts[0]], [SamplingSpec(max_tokens=0, temperature=1.0)])[0].token_ids == []
