"""CoS inside vLLM (offline ``LLM``): greedy identity and first-token distribution.

For each rule (weighted ensemble, contrastive) one engine per schedule is started
(standard, naive, alternate; one engine alive at a time):

* greedy: 20 prompts as single requests and 16 of them as one batch; naive and alternate are
  token-identical to the engine's standard mode and to ``vllm_cos.reference.generate``;
* sampling (naive engine for CD, alternate for WE): the first generated token over many
  seeded requests follows r = C(p_large, p_small) tempered (chi-square), r computed with
  transformers models;
* sampling parameters (alternate, WE): stop strings / stop tokens / EOS inside an accepted run,
  exact max_tokens, n > 1, seeds, and logprobs equal to log r of the reference models.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from engine_helpers import (CODE_PROMPTS as TEXTS, PROMPT_FOR_SAMPLING, OneEngine, assert_prompt_logprobs_are_log_r,
                            greedy_identity, r_next, r_second_token)

pytestmark = pytest.mark.engine

MAX_TOKENS = 24
NUM_SAMPLES = 3000
P_THRESHOLD = 1e-3
RULES = {
    "we": {"name": "weighted_ensemble", "weights": {"large": 0.5, "small": 0.5}},
    "cd": {"name": "contrastive", "expert": "large", "amateur": "small", "mu": 0.5},
}


@pytest.fixture(scope="module")
def models(tiny_models) -> dict[str, Path]:
    return tiny_models


def cos_spec(models, rule: str, schedule: str) -> dict:
    return {"models": [{"name": "large", "path": str(models["large"]), "gamma": 1},
                       {"name": "small", "path": str(models["small"]), "gamma": 3}],
            "rule": RULES[rule], "schedule": schedule}


@pytest.fixture(scope="module")
def engines(models):
    e = OneEngine(models["large"], lambda *key: cos_spec(models, *key))
    yield e
    e.close()


@pytest.fixture(scope="module")
def prompts(models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models["large"]))
    return [tok.encode(t, add_special_tokens=False) for t in TEXTS]


_results: dict = {}


def _reference(models, rule, prompts):
    key = ("reference", rule)
    if key not in _results:
        from vllm_cos import reference
        from vllm_cos.config import load_config

        cfg = load_config(cos_spec(models, rule, "standard"))
        _results[key] = reference.generate(cfg, prompts, MAX_TOKENS)
    return _results[key]


# Ordered so that consecutive tests share the one live engine (7 engine starts in all):
# the last greedy engine (naive, cd) serves the first chi-square tests, the alternate-we engine
# of the second ones also serves the sampling-parameter tests below.
GREEDY_ORDER = [("standard", "we"), ("standard", "cd"), ("alternate", "cd"), ("naive", "we"),
                ("alternate", "we"), ("naive", "cd")]
SAMPLING_ORDER = [("cd", "naive", (1.0, 0, 1.0)), ("cd", "naive", (0.7, 20, 0.9)),
                  ("we", "alternate", (1.0, 0, 1.0)), ("we", "alternate", (0.7, 20, 0.9))]


@pytest.mark.parametrize("schedule,rule", GREEDY_ORDER, ids=[f"{s}-{r}" for s, r in GREEDY_ORDER])
def test_greedy_identity(engines, models, prompts, rule, schedule):
    llm = engines.get(rule, schedule)
    single = greedy_identity(llm, prompts, MAX_TOKENS, _reference(models, rule, prompts), f"{schedule}/{rule}")
    _results[(rule, schedule)] = single
    if (rule, "standard") in _results:
        assert single == _results[(rule, "standard")]
    if schedule == "standard":  # logprobs of the wrapper architecture are log r too
        _assert_logprobs_are_log_r(llm, models, rule, prompts, num_sampled=1)
    assert_prompt_logprobs_are_log_r(llm, [prompts[i] for i in (2, 5, 11)],
                                     lambda ids: _reference_log_r(models, rule, ids))


def _expected_first_token(models, rule, prompt, temperature, top_k, top_p):
    from vllm_cos.config import load_config

    return r_next(load_config(cos_spec(models, rule, "alternate")), prompt, temperature, top_k, top_p)


def _chi_square(counts: Counter, probs: torch.Tensor, n: int) -> float:
    from scipy import stats

    expected = (probs * n).numpy()
    observed = [counts.get(i, 0) for i in range(len(expected))]
    big = [i for i, e in enumerate(expected) if e >= 5.0]
    rest_e = float(sum(e for i, e in enumerate(expected) if e < 5.0))
    rest_o = sum(o for i, o in enumerate(observed) if expected[i] < 5.0)
    assert rest_o <= max(3 * rest_e + 10, 10), "tokens outside r's support"
    obs = [observed[i] for i in big] + ([rest_o] if rest_e >= 5.0 else [])
    exp = [expected[i] for i in big] + ([rest_e] if rest_e >= 5.0 else [])
    scale = sum(obs) / sum(exp)
    return float(stats.chisquare(obs, [e * scale for e in exp]).pvalue)


@pytest.mark.parametrize("rule,schedule,sampling", SAMPLING_ORDER,
                         ids=[f"{r}-{s}-T{t[0]}" + ("_k20_p0.9" if t[1] else "") for r, s, t in SAMPLING_ORDER])
def test_first_token_distribution_is_r(engines, models, prompts, rule, schedule, sampling):
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    temperature, top_k, top_p = sampling
    tok = AutoTokenizer.from_pretrained(str(models["large"]))
    prompt = tok.encode(PROMPT_FOR_SAMPLING, add_special_tokens=False)
    llm = engines.get(rule, schedule)
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=s, max_tokens=1)
              for s in range(NUM_SAMPLES)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=prompt)] * NUM_SAMPLES, params, use_tqdm=False)
    counts = Counter(o.outputs[0].token_ids[0] for o in outs)
    probs = _expected_first_token(models, rule, prompt, temperature, top_k, top_p)
    p_value = _chi_square(counts, probs, NUM_SAMPLES)
    assert p_value > P_THRESHOLD, f"{rule} {sampling}: chi-square p = {p_value:.2e}"
    # same seed => same token
    again = llm.generate([TokensPrompt(prompt_token_ids=prompt)] * 20, params[:20], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs[:20]]
    if schedule == "naive" and temperature == 1.0:  # logprobs of r under naive too
        _assert_logprobs_are_log_r(llm, models, rule, prompts, num_sampled=2)


# ---------------------------------------------------------------- sampling parameters (alternate, WE)
# Every test below runs on the engine the last chi-square test left alive.
PARAMS_ENGINE = ("we", "alternate")


def _generate(llm, prompts, params):
    from vllm.inputs import TokensPrompt

    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


def test_stop_tokens_and_strings_inside_accepted_runs(engines, models, prompts):
    """Stop at a token / string in the middle of the greedy output: the output ends exactly there.

    Every position 2..MAX_TOKENS-2 of two prompts is tried as a stop point, so stop points fall
    inside accepted runs (the engine emits several tokens per step; mean accepted length > 1 is
    asserted below) as well as at their ends.
    """
    from vllm import SamplingParams
    from vllm_cos.offline import cos_stats

    llm = engines.get(*PARAMS_ENGINE)
    expected = _reference(models, PARAMS_ENGINE[0], prompts)
    tok = llm.get_tokenizer()
    greedy = dict(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    cases = []  # (prompt index, stop position, SamplingParams, kind)
    for i in (0, 5):
        out = expected[i]
        for j in range(2, MAX_TOKENS - 1):
            if out[j] not in out[:j]:  # first occurrence: the stop token is at j
                cases.append((i, j, SamplingParams(stop_token_ids=[out[j]], **greedy), "token"))
            text = tok.decode(out[j:j + 2])
            full = tok.decode(out)
            if text.strip() and full.find(text) == len(tok.decode(out[:j])):
                cases.append((i, j, SamplingParams(stop=[text], **greedy), "string"))
    assert sum(k == "token" for *_, k in cases) >= 10 and sum(k == "string" for *_, k in cases) >= 5
    before = cos_stats(llm)[0]
    outs = _generate(llm, [prompts[i] for i, *_ in cases], [c[2] for c in cases])
    after = cos_stats(llm)[0]
    assert (after["tokens_emitted"] - before["tokens_emitted"]) / (after["row_steps"] - before["row_steps"]) > 1.5
    for (i, j, params, kind), o in zip(cases, outs):
        got = o.outputs[0]
        assert got.finish_reason == "stop", (kind, i, j)
        if kind == "token":
            assert list(got.token_ids) == expected[i][:j + 1], (kind, i, j)
            assert got.stop_reason == expected[i][j]
        else:
            full = tok.decode(expected[i])
            stop = params.stop[0]
            assert got.text == full[:full.find(stop)], (kind, i, j, stop)
            assert got.stop_reason == stop


def test_eos_inside_accepted_run(engines, models, prompts):
    """EOS is honoured mid-run: with EOS made a stop token (the tiny models seldom emit their
    own), and with the model's own EOS when a greedy output contains it."""
    from vllm import SamplingParams

    llm = engines.get(*PARAMS_ENGINE)
    expected = _reference(models, PARAMS_ENGINE[0], prompts)
    eos = llm.get_tokenizer().eos_token_id
    with_eos = [i for i, out in enumerate(expected) if eos in out]
    if with_eos:
        outs = _generate(llm, [prompts[i] for i in with_eos], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
        for i, o in zip(with_eos, outs):
            cut = expected[i].index(eos)
            assert list(o.outputs[0].token_ids) == expected[i][:cut + 1] and o.outputs[0].finish_reason == "stop"
    # EOS through the same scheduler path, at chosen positions (the tokenizer's EOS replaced)
    i = 3
    out = expected[i]
    for j in (3, 7, 12):
        if out[j] in out[:j]:
            continue
        o = _generate(llm, [prompts[i]], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                        stop_token_ids=[out[j]], include_stop_str_in_output=True))[0]
        assert list(o.outputs[0].token_ids) == out[:j + 1]


def test_max_tokens_exact(engines, models, prompts):
    from vllm import SamplingParams

    llm = engines.get(*PARAMS_ENGINE)
    expected = _reference(models, PARAMS_ENGINE[0], prompts)
    lengths = [1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 17, 23]
    outs = _generate(llm, prompts[:len(lengths)],
                     [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths])
    for n, o, exp in zip(lengths, outs, expected):
        assert list(o.outputs[0].token_ids) == exp[:n] and o.outputs[0].finish_reason == "length"
    # sampled too
    outs = _generate(llm, prompts[:len(lengths)],
                     [SamplingParams(temperature=1.0, seed=i, max_tokens=n, ignore_eos=True)
                      for i, n in enumerate(lengths)])
    assert [len(o.outputs[0].token_ids) for o in outs] == lengths


def test_n_and_seeds(engines, models, prompts):
    from vllm import SamplingParams

    llm = engines.get(*PARAMS_ENGINE)
    expected = _reference(models, PARAMS_ENGINE[0], prompts)
    # vLLM refuses n > 1 at temperature 0; top_k = 1 is greedy: n identical copies of the greedy output
    o = _generate(llm, [prompts[0]], SamplingParams(n=3, temperature=1.0, top_k=1, max_tokens=MAX_TOKENS,
                                                    ignore_eos=True))[0]
    assert len(o.outputs) == 3 and all(list(c.token_ids) == expected[0] for c in o.outputs)
    # seeded n = 3: three outputs, reproducible alone and inside a batch with other requests
    seeded = SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=MAX_TOKENS, ignore_eos=True)
    first = [list(c.token_ids) for c in _generate(llm, [prompts[1]], seeded)[0].outputs]
    assert len(first) == 3 and all(len(t) == MAX_TOKENS for t in first)
    assert len({tuple(t) for t in first}) > 1, "n=3 sampled copies are all identical"
    others = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    batch = _generate(llm, [prompts[2], prompts[1], prompts[3]], [others, seeded, others])
    assert [list(c.token_ids) for c in batch[1].outputs] == first
    # admitted while 64 others decode (max_num_seqs 64): its prefill shares steps with drafts
    short = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)
    late = _generate(llm, [prompts[2]] * 64 + [prompts[1]], [short] * 64 + [seeded])
    assert [list(c.token_ids) for c in late[64].outputs] == first
    # same seed => same text (n = 1)
    single = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True)
    a = _generate(llm, prompts[4:6], single)
    b = _generate(llm, prompts[4:6], single)
    assert [o.outputs[0].text for o in a] == [o.outputs[0].text for o in b]


def _reference_log_r(models, rule, token_ids):
    """log r at every position of ``token_ids`` (transformers forwards + the rule)."""
    from transformers import AutoModelForCausalLM

    from vllm_cos.combine import build_combiner
    from vllm_cos.config import load_config

    cfg = load_config(cos_spec(models, rule, "alternate"))
    logits = []
    for name in cfg.model_names:
        key = ("hf", name)
        if key not in _results:
            _results[key] = AutoModelForCausalLM.from_pretrained(str(models[name]), dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(_results[key](torch.tensor([token_ids])).logits[0])
    return torch.log_softmax(build_combiner(cfg.rule, cfg.model_names)(torch.stack(logits)), dim=-1)


def test_logprobs_are_log_r(engines, models, prompts):
    """Sampled (T = 1) and greedy outputs report logprobs of r: the emitted token's and the top 5,
    equal to log r from the reference models at every position (drafts accepted, residual
    tokens and verified bonus tokens alike).  The standard schedule is checked the same way
    inside test_greedy_identity[standard-*]."""
    _assert_logprobs_are_log_r(engines.get(*PARAMS_ENGINE), models, PARAMS_ENGINE[0], prompts, num_sampled=4)


def _assert_logprobs_are_log_r(llm, models, rule, prompts, num_sampled):
    from vllm import SamplingParams

    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
              for s in range(num_sampled)] + [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                             ignore_eos=True, logprobs=5)]
    chosen = [prompts[i] for i in (0, 1, 7, 9, 12)[:num_sampled]] + [prompts[12]]
    outs = _generate(llm, chosen, params)
    worst = 0.0
    for prompt, o in zip(chosen, outs):
        gen = o.outputs[0]
        assert gen.logprobs is not None and len(gen.logprobs) == len(gen.token_ids) == MAX_TOKENS
        log_r = _reference_log_r(models, rule, prompt + list(gen.token_ids))
        for j, (token, entry) in enumerate(zip(gen.token_ids, gen.logprobs)):
            ref = log_r[len(prompt) - 1 + j]
            assert token in entry
            worst = max(worst, abs(entry[token].logprob - float(ref[token])))
            top = torch.topk(ref, 6)
            values, indices = top.values.tolist(), top.indices.tolist()
            clear = {t for t, v in zip(indices[:5], values[:5]) if v - values[5] > 1e-3}  # no near-ties
            assert clear <= set(entry), (j, clear, set(entry))
            for t in clear:
                worst = max(worst, abs(entry[t].logprob - float(ref[t])))
    assert worst < 2e-3, f"logprobs differ from log r by {worst}"


@pytest.mark.parametrize("share", [0, 10 ** 6], ids=["void", "refeed"])
def test_changed_proposals_void_or_refeed(engines, models, prompts, monkeypatch, share):
    """Rows whose served proposal the group changed either re-feed the verified token (a pass
    of the batch) or draft from the proposal's context with their drafts voided; both are exact.
    Forced each way (``REFEED_SHARE``): greedy identity single and batched, and the second
    generated token over NUM_SAMPLES unseeded requests in one batch follows its marginal under r."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_cos.adapters import proposer
    from vllm_cos.config import load_config

    monkeypatch.setattr(proposer, "REFEED_SHARE", share)
    rule, schedule = PARAMS_ENGINE
    llm = engines.get(rule, schedule)
    greedy_identity(llm, prompts, MAX_TOKENS, _reference(models, rule, prompts), f"{schedule}/{rule} share={share}")
    prompt = prompts[3][:6]
    # unseeded: a seeded row is always re-fed (its stream must not depend on the batch)
    params = [SamplingParams(temperature=1.0, max_tokens=2, ignore_eos=True) for _ in range(NUM_SAMPLES)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=prompt)] * NUM_SAMPLES, params, use_tqdm=False)
    counts = Counter(o.outputs[0].token_ids[1] for o in outs)
    expected = r_second_token(load_config(cos_spec(models, rule, schedule)), prompt)
    p_value = _chi_square(counts, expected, NUM_SAMPLES)
    assert p_value > P_THRESHOLD, f"second token, share={share}: chi-square p = {p_value:.2e}"
