"""Stock vLLM ``draft_model`` speculative decoding is exact at T > 0 on the CPU build.

These tests run vLLM's own speculative decoding (no CoS code on the sampling path) with the
vllm-cos plugin loaded, so they check the CPU ``expand_kernel`` fix
(``vllm_cos/adapters/cpu_expand.py``) end to end:

* draft = target, probabilistic drafts, T = 1: (almost) every draft must be accepted, read
  from vLLM's own ``vllm:spec_decode_num_accepted_tokens`` / ``..._num_draft_tokens``;
* small model drafting for the large one: the second generated token, the first one that goes
  through the rejection sampler, must follow the target's own sampling distribution given the
  first token (chi-square over 20,000 seeded requests per sampling configuration, expected
  probabilities from a transformers forward of the target + ``apply_sampling_params``).

Two in-process engine starts in all (one per draft configuration).
"""

from __future__ import annotations

import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from vllm_cos.offline import shutdown_llm

pytestmark = pytest.mark.engine

P_THRESHOLD = 1e-3
NUM_REQUESTS = 20_000  # per sampling configuration
MIN_EXPECTED = 5.0  # chi-square bins with a smaller expected count are pooled
MIN_FIRST_TOKEN_SHARE = 0.01  # condition on first tokens at least this likely (at most 16)
# Short prompts keep 40,000 requests cheap; the one whose first token is most predictable
# (under the target at T=1) is used, so that most requests fall in a conditioning group.
PROMPT_CANDIDATES = ("import", "def", "return", "self.", "class", "for i in")
# (temperature, top_k, top_p); top_k 0 / top_p 1 = off
CONFIGS = {"T1": (1.0, 0, 1.0), "T0.7_k20_p0.9": (0.7, 20, 0.9)}


def _engine(model: str, draft: str, num_spec: int, max_num_seqs: int):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    return LLM(
        model=model, tokenizer=model, dtype="float32", enforce_eager=True, max_model_len=256,
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max(4096, 8 * max_num_seqs), gpu_memory_utilization=0.2,
        seed=0, disable_log_stats=False, enable_prefix_caching=False,
        speculative_config=dict(method="draft_model", model=draft,
                                num_speculative_tokens=num_spec,
                                draft_sample_method="probabilistic"),
    )


def _spec_counters(llm) -> tuple[float, float]:
    accepted = drafted = 0.0
    for metric in llm.get_metrics():
        if metric.name == "vllm:spec_decode_num_accepted_tokens":
            accepted += metric.value
        elif metric.name == "vllm:spec_decode_num_draft_tokens":
            drafted += metric.value
    return accepted, drafted


@pytest.fixture(scope="module")
def target_hf(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["large"]), dtype=torch.float32)
    return model.eval()


def _conditioning_tokens(p1: np.ndarray) -> list[int]:
    return [int(t) for t in np.argsort(-p1) if p1[t] >= MIN_FIRST_TOKEN_SHARE][:16]


@pytest.fixture(scope="module")
def prompt_ids(tiny_models, target_hf) -> dict[str, list[int]]:
    """For each sampling configuration, the candidate prompt whose test has the most chi-square
    bins (expected count >= MIN_EXPECTED) for the second token, summed over first tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models["large"]))
    bos = tok.bos_token_id if tok.bos_token_id is not None else 0
    chosen = {}
    for name, config in CONFIGS.items():
        best, best_bins = None, -1
        for text in PROMPT_CANDIDATES:
            ids = [bos] + tok(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                p1 = _sampling_probs(target_hf(torch.tensor([ids])).logits[0, -1:], config)
                p1 = p1[0].numpy()
                firsts = _conditioning_tokens(p1)
                logits2 = target_hf(torch.tensor([ids + [t] for t in firsts])).logits[:, -1]
            p2 = _sampling_probs(logits2, config).numpy()
            bins = sum(int((p2[i] * p1[t] * NUM_REQUESTS >= MIN_EXPECTED).sum()) - 1
                       for i, t in enumerate(firsts))
            if bins > best_bins:
                best, best_bins = ids, bins
        chosen[name] = best
    return chosen


# ------------------------------------------------------------------------------------------
# draft = target


def test_draft_equals_target_accepts_all_drafts_at_t1(tiny_models, prompt_ids):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    model = str(tiny_models["large"])
    llm = _engine(model, model, num_spec=4, max_num_seqs=8)
    try:
        base = list(prompt_ids["T1"])
        prompts = [TokensPrompt(prompt_token_ids=base + [10 + i]) for i in range(4)]
        params = [SamplingParams(temperature=1.0, max_tokens=48, seed=100 + i, ignore_eos=True,
                                 detokenize=False) for i in range(4)]
        acc0, draft0 = _spec_counters(llm)
        outs = llm.generate(prompts, params, use_tqdm=False)
        acc1, draft1 = _spec_counters(llm)
    finally:
        shutdown_llm(llm)
    accepted, drafted = acc1 - acc0, draft1 - draft0
    print(f"draft = target, T=1: accepted {accepted:.0f} of {drafted:.0f} drafts")
    assert all(len(o.outputs[0].token_ids) == 48 for o in outs)
    assert drafted >= 40, drafted
    assert accepted >= 0.95 * drafted, (accepted, drafted)


# ------------------------------------------------------------------------------------------
# small drafts for large: distribution of the first rejection-sampled token


def _sampling_probs(logits: torch.Tensor, config) -> torch.Tensor:
    from vllm_cos.sampling import apply_sampling_params

    temperature, top_k, top_p = config
    n = logits.shape[0]
    return apply_sampling_params(
        logits.float(), torch.full((n,), temperature),
        torch.full((n,), top_k, dtype=torch.long) if top_k > 0 else None,
        torch.full((n,), top_p) if top_p < 1.0 else None,
    ).double()


@pytest.fixture(scope="module")
def small_draft_samples(tiny_models, prompt_ids):
    """{config name: Counter of (t1, t2)} from one engine, one generate call."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    model, draft = str(tiny_models["large"]), str(tiny_models["small"])
    llm = _engine(model, draft, num_spec=1, max_num_seqs=512)
    try:
        params, names = [], []
        for c, (name, (temperature, top_k, top_p)) in enumerate(CONFIGS.items()):
            for i in range(NUM_REQUESTS):
                params.append(SamplingParams(
                    temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=2,
                    ignore_eos=True, seed=1_000_000 * (c + 1) + i, detokenize=False))
                names.append(name)
        acc0, draft0 = _spec_counters(llm)
        outs = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids[name]) for name in names],
                            params, use_tqdm=False)
        acc1, draft1 = _spec_counters(llm)
    finally:
        shutdown_llm(llm)
    samples = {name: Counter() for name in CONFIGS}
    for name, out in zip(names, outs):
        ids = out.outputs[0].token_ids
        assert len(ids) == 2, ids
        samples[name][(ids[0], ids[1])] += 1
    print(f"small drafts for large: accepted {acc1 - acc0:.0f} of {draft1 - draft0:.0f} drafts")
    return dict(samples=samples, prompts=prompt_ids, model=model,
                accepted=acc1 - acc0, drafted=draft1 - draft0)


def _pooled_chi2(observed: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom, sparse bins pooled into one."""
    total = observed.sum()
    assert observed[probs <= 0].sum() == 0, "sample in a bin of probability 0"
    expected = probs * total
    big = expected >= MIN_EXPECTED
    obs, exp = list(observed[big]), list(expected[big])
    if (~big).any() and expected[~big].sum() > 0:
        obs.append(observed[~big].sum())
        exp.append(expected[~big].sum())
    obs, exp = np.array(obs), np.array(exp)
    exp = exp * (obs.sum() / exp.sum())
    return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_small_draft_rejection_sampled_token_has_target_distribution(
        name, small_draft_samples, target_hf):
    config = CONFIGS[name]
    counts: Counter = small_draft_samples["samples"][name]
    prompt = small_draft_samples["prompts"][name]
    # Every request's second token was verified by the rejection sampler: one draft per
    # request was scheduled (num_speculative_tokens=1; counters cover both configurations).
    assert small_draft_samples["drafted"] >= 2 * NUM_REQUESTS

    with torch.no_grad():
        logits1 = target_hf(torch.tensor([prompt])).logits[0, -1:]
    p1 = _sampling_probs(logits1, config)[0].numpy()
    vocab = p1.shape[0]
    first = np.zeros(vocab)
    for (t1, _), n in counts.items():
        first[t1] += n
    stat1, dof1 = _pooled_chi2(first, p1)
    p_first = stats.chi2.sf(stat1, dof1) if dof1 else 1.0

    conditioning = _conditioning_tokens(p1)
    assert conditioning, "prompt has no first token likely enough to condition on"
    with torch.no_grad():
        batch = torch.tensor([prompt + [int(t)] for t in conditioning])
        logits2 = target_hf(batch).logits[:, -1]
    p2 = _sampling_probs(logits2, config).numpy()
    stat2, dof2, n_cond = 0.0, 0, 0
    for row, t1 in enumerate(conditioning):
        second = np.zeros(vocab)
        for (a, b), n in counts.items():
            if a == t1:
                second[b] += n
        n_cond += int(second.sum())
        if second.sum() < 100:
            continue
        s, d = _pooled_chi2(second, p2[row])
        stat2, dof2 = stat2 + s, dof2 + d
    assert dof2 >= 5 and n_cond >= 0.3 * NUM_REQUESTS, (dof2, n_cond)
    p_second = stats.chi2.sf(stat2, dof2) if dof2 else 1.0
    print(f"{name}: prompt {prompt}; first token chi2={stat1:.1f} dof={dof1} p={p_first:.3g}; second token "
          f"| {len(conditioning)} first tokens ({n_cond} requests) chi2={stat2:.1f} "
          f"dof={dof2} p={p_second:.3g}")
    assert p_first > P_THRESHOLD, (stat1, dof1, p_first)
    assert p_second > P_THRESHOLD, (stat2, dof2, p_second)
    assert not math.isnan(p_second)
