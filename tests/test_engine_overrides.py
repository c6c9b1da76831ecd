"""Per-request collaboration settings in the engine (``SamplingParams.extra_args``;
vllm_cos.overrides): under ``standard``, ``naive`` and ``alternate`` a batch mixing requests
with different WE weights (a list, a mapping), ``cos_speculate: 0`` and the file's weights is
greedy-identical, row by row, to the reference decoder configured with each row's weights, and
each row's prompt logprobs are log r with its weights; CD's ``cos_mu`` likewise; the first token of 1500
requests overriding the weights at T = 1 follows r with those weights (chi-square); an invalid
setting is refused at submission, naming the key, and the engine keeps serving."""

from __future__ import annotations

from collections import Counter

import pytest
from engine_helpers import OneEngine, r_next, reference_log_r
from stats import P_THRESHOLD, chi2_pvalue

from vllm_cos import reference
from vllm_cos.config import load_config

pytestmark = pytest.mark.engine

MAX_TOKENS = 24
TEXTS = ["def main(", "import os\nimport sys\n", "class Foo:\n    def __init__(self", "for i in range(10):\n"]
WE = {"name": "weighted_ensemble", "weights": {"large": 0.5, "small": 0.5}}
CD = {"name": "contrastive", "expert": "large", "amateur": "small", "mu": 0.1}


def _spec(models, rule: dict, schedule: str = "alternate") -> dict:
    return {"models": [{"name": "large", "path": str(models["large"]), "gamma": 1},
                       {"name": "small", "path": str(models["small"]), "gamma": 3}],
            "rule": rule, "schedule": schedule}


@pytest.fixture(scope="module")
def engines(tiny_models):
    e = OneEngine(tiny_models["large"],
                  lambda rule, schedule="alternate": _spec(tiny_models, WE if rule == "we" else CD, schedule))
    yield e
    e.close()


@pytest.fixture(scope="module")
def prompts(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models["large"]))
    return [tok.encode(t) for t in TEXTS]


def _generate(llm, prompts, extras, temperature=0.0, max_tokens=MAX_TOKENS):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, extra_args=e)
              for e in extras]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _reference(models, rule: dict, prompt) -> list[int]:
    cfg = load_config({**_spec(models, rule), "schedule": "standard"})
    return reference.generate(cfg, [prompt], MAX_TOKENS)[0]


WE_SETTINGS = [(None, {"large": 0.5, "small": 0.5}), ({"cos_weights": [0.9, 0.1]}, {"large": 0.9, "small": 0.1}),
               ({"cos_weights": {"small": 0.8, "large": 0.2}}, {"large": 0.2, "small": 0.8}),
               ({"cos_speculate": 0}, {"large": 0.5, "small": 0.5}),
               ({"cos_weights": [1.0, 0.0], "cos_speculate": 0}, {"large": 1.0, "small": 0.0})]


@pytest.mark.parametrize("schedule", ["standard", "naive", "alternate"])
def test_mixed_weights_batch_is_each_row_s_reference(engines, tiny_models, prompts, schedule):
    llm = engines.get("we", schedule)
    rows = [(p, extra, weights) for p in prompts for extra, weights in WE_SETTINGS][:16]
    got = _generate(llm, [p for p, _, _ in rows], [e for _, e, _ in rows])
    for (prompt, extra, weights), tokens in zip(rows, got):
        want = _reference(tiny_models, {"name": "weighted_ensemble", "weights": weights}, prompt)
        assert tokens == want, f"{schedule}, {extra}: differs from the reference with weights {weights}"
    _assert_prompt_logprobs_per_row(llm, tiny_models, prompts[:3], WE_SETTINGS[:3], schedule)


def _assert_prompt_logprobs_per_row(llm, models, prompts, settings, schedule):
    """One batch, each row with its own settings: every prompt token's logprob is log r of its weights."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0, extra_args=extra)
              for extra, _ in settings]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    for prompt, (extra, weights), out in zip(prompts, settings, outs):
        cfg = load_config(_spec(models, {"name": "weighted_ensemble", "weights": weights}))
        log_r = reference_log_r(cfg, prompt)
        worst = max(abs(out.prompt_logprobs[i][prompt[i]].logprob - float(log_r[i - 1, prompt[i]]))
                    for i in range(1, len(prompt)))
        assert worst < 2e-3, f"{schedule}, {extra}: prompt logprobs differ from log r by {worst}"


def test_overridden_row_first_token_follows_its_r(engines, tiny_models, prompts):
    llm = engines.get("we")
    n = 1500
    # [0.95, 0.05] here is far from the file's [0.5, 0.5] (chi-square non-centrality ~420 at n = 1500):
    # a dropped override fails this test
    got = _generate(llm, [prompts[0]] * n, [{"cos_weights": [0.95, 0.05]}] * n, temperature=1.0, max_tokens=1)
    cfg = load_config({**_spec(tiny_models, {"name": "weighted_ensemble", "weights": [0.95, 0.05]})})
    expected = r_next(cfg, prompts[0]).numpy()
    counts = Counter(t[0] for t in got)
    p_value = chi2_pvalue([counts.get(t, 0) for t in range(len(expected))], expected)
    assert p_value > P_THRESHOLD, f"first token under cos_weights [0.95, 0.05]: chi-square p = {p_value:.2e}"


def test_invalid_setting_is_refused_and_the_engine_serves_on(engines, tiny_models, prompts):
    from vllm.exceptions import VLLMValidationError

    llm = engines.get("we")
    for extra, key in [({"cos_weights": [0.7, 0.7]}, "cos_weights"), ({"cos_mu": 0.2}, "cos_mu"),
                       ({"cos_speculate": "yes"}, "cos_speculate"), ({"cos_weigths": [1, 0]}, "cos_weigths")]:
        with pytest.raises(VLLMValidationError, match=key):
            _generate(llm, prompts[:1], [extra])
    assert _generate(llm, prompts[:1], [None]) == [_reference(tiny_models, WE, prompts[0])]


def test_cd_mu_per_request(engines, tiny_models, prompts):
    llm = engines.get("cd")
    extras = [None, {"cos_mu": 0.5}, {"cos_mu": 0.0}, {"cos_mu": 0.5, "cos_speculate": 0}]
    got = _generate(llm, prompts, extras)
    for prompt, extra, tokens in zip(prompts, extras, got):
        mu = (extra or {}).get("cos_mu", 0.1)
        assert tokens == _reference(tiny_models, {**CD, "mu": mu}, prompt), f"{extra}: differs from mu {mu}"
