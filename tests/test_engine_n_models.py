"""n-model CoS inside vLLM: three collaborators (large serves; medium and small draft).

Engines (one alive at a time): for equal weights ``standard``, ``alternate`` with gamma 1
each (the paper's 3-model setting) and ``naive`` (small drafts 3); for unequal weights
(0.5 / 0.3 / 0.2) ``standard`` and ``alternate`` with gamma [1, 1, 2].

* greedy: 20 prompts one at a time and 16 of them as one batch are token-identical to the
  engine's ``standard`` and to :func:`vllm_cos.reference.generate` (transformers models);
* sampling (alternate, equal weights, T = 1, 3,000 seeded requests): the first token (T's
  bonus verified by the two-model draft group) follows r over the three models, the
  second token given the most frequent first one (medium's draft, verified in the
  rejection sampler against r) does too, and so does the third given the two before it
  (small's draft, which medium scores lazily: verified by the proposer) (chi-square); the
  first and third tokens of 3,000 unseeded requests too (min(1, r/q), not the seeded races);
* lazy scoring is on by default: every CoS engine skips member passes (``member_passes_skipped``),
  and sampled and greedy outputs report logprobs of r at every position;
* start-up logs the KV capacity shared by the three models and who drafts what;
* the CoS counters add up: the CoS samplers emit every returned token, and at most a step's
  drafts more per request (the last step's overshoot past max_tokens, which vLLM cuts);
* four models (a perturbed copy of small as the fourth, weights 0.4/0.3/0.2/0.1, gamma
  [1, 1, 1, 2]), served by *small*, so the draft group mixes attention shapes (large: 4 heads,
  medium: 2): ``standard`` and ``alternate`` greedy-identical to the reference, 8 prompts.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import (CODE_PROMPTS, PROMPT_FOR_SAMPLING, OneEngine, assert_prompt_logprobs_are_log_r, greedy,
                            greedy_identity, r_next, r_next_rows, reference_log_r)
from stats import P_THRESHOLD, chi2_pvalue

from vllm_cos.config import load_config
from vllm_cos.offline import cos_stats

pytestmark = pytest.mark.engine

MAX_TOKENS = 24
NUM_SAMPLES = 3000
NAMES = ("large", "medium", "small")
WEIGHTS = {"equal": {"large": 1 / 3, "medium": 1 / 3, "small": 1 / 3},
           "unequal": {"large": 0.5, "medium": 0.3, "small": 0.2}}
GAMMAS = {("equal", "alternate"): [1, 1, 1], ("unequal", "alternate"): [1, 1, 2],
          ("equal", "naive"): [1, 1, 3], ("equal", "standard"): [1, 1, 1], ("unequal", "standard"): [1, 1, 1]}


def cos_spec(models, weights: str, schedule: str) -> dict:
    spec = {"models": [{"name": n, "path": str(models[n])} for n in NAMES],
            "rule": {"name": "weighted_ensemble", "weights": WEIGHTS[weights]},
            "schedule": schedule, "gamma": GAMMAS[(weights, schedule)]}
    if schedule == "naive":
        spec["proposer"] = "small"
    return spec


class _Lines(logging.Filter):
    """Records every message logged through a logger; a filter, because vLLM re-applies its
    logging config at each engine start, which drops child loggers' handlers (not filters)."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def filter(self, record):
        self.lines.append(record.getMessage())
        return True


@pytest.fixture(scope="module")
def startup_log():
    """Every 'vllm.cos' log line of this module's engines (INFO: vLLM's default level)."""
    recorder, logger = _Lines(), logging.getLogger("vllm.cos")
    logger.addFilter(recorder)
    yield recorder.lines
    logger.removeFilter(recorder)


@pytest.fixture(scope="module")
def engines(tiny_models, startup_log):
    e = OneEngine(tiny_models["large"], lambda *key: cos_spec(tiny_models, *key))
    yield e
    e.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_models["large"]))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode(t, add_special_tokens=False) for t in CODE_PROMPTS]


_results: dict = {}


def _greedy(llm, prompts, batch: bool):
    return greedy(llm, prompts, MAX_TOKENS, batch)


def _reference(models, weights, prompts):
    if ("reference", weights) not in _results:
        from vllm_cos import reference
        from vllm_cos.config import load_config

        cfg = load_config(cos_spec(models, weights, "standard"))
        _results[("reference", weights)] = reference.generate(cfg, prompts, MAX_TOKENS)
    return _results[("reference", weights)]


# standard first for each weighting, so the CoS engines are compared with it; the equal-weight
# alternate engine comes last and stays alive for the sampling tests.
GREEDY_ORDER = [("equal", "standard"), ("equal", "naive"), ("unequal", "standard"), ("unequal", "alternate"),
                ("equal", "alternate")]


@pytest.mark.parametrize("weights,schedule", GREEDY_ORDER, ids=[f"{s}-{w}" for w, s in GREEDY_ORDER])
def test_greedy_identity_three_models(engines, tiny_models, prompts, weights, schedule):
    llm = engines.get(weights, schedule)
    before = (cos_stats(llm)[0] or {}) if schedule != "standard" else {}
    single = greedy_identity(llm, prompts, MAX_TOKENS, _reference(tiny_models, weights, prompts),
                             f"{schedule}/{weights}")
    _results[(weights, schedule)] = single
    if schedule != "standard":
        assert single == _results[(weights, "standard")]
        after = cos_stats(llm)[0]
        emitted = after["tokens_emitted"] - before.get("tokens_emitted", 0)
        returned = sum(map(len, single)) + sum(map(len, single[:16]))  # the batch equals single[:16]
        # a request's last step may emit up to its draft count past max_tokens (vLLM cuts those)
        drafts_per_step = sum(GAMMAS[(weights, schedule)][1:]) if schedule == "alternate" else 3
        assert returned <= emitted <= returned + (len(single) + 16) * drafts_per_step
        drafts = after["drafts_proposed"] - before.get("drafts_proposed", 0)
        assert drafts > 0 and after["drafts_accepted"] <= after["drafts_proposed"]
        # lazy scoring (the default): a member done drafting skipped the step's later passes
        assert after["member_passes_skipped"] > before.get("member_passes_skipped", 0)
    cfg = load_config(cos_spec(tiny_models, weights, schedule))
    assert_prompt_logprobs_are_log_r(llm, [prompts[i] for i in (1, 6, 13)], lambda ids: reference_log_r(cfg, ids))


def _r_next(models, weights: str, token_ids: list[int]) -> np.ndarray:
    from vllm_cos.config import load_config

    return r_next(load_config(cos_spec(models, weights, "alternate")), token_ids).numpy()


def test_first_two_tokens_follow_r(engines, tiny_models, tokenizer):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = engines.get("equal", "alternate")
    prompt = tokenizer.encode(PROMPT_FOR_SAMPLING, add_special_tokens=False)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=3, ignore_eos=True) for s in range(NUM_SAMPLES)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=prompt)] * NUM_SAMPLES, params, use_tqdm=False)
    triples = [tuple(o.outputs[0].token_ids) for o in outs]
    assert all(len(t) == 3 for t in triples)
    pairs = [t[:2] for t in triples]

    r_first = _r_next(tiny_models, "equal", prompt)
    first_counts = np.bincount([p[0] for p in pairs], minlength=len(r_first))
    p_first = chi2_pvalue(first_counts, r_first)
    assert p_first > P_THRESHOLD, f"first token: chi-square p = {p_first:.2e}"

    mode = Counter(p[0] for p in pairs).most_common(1)[0][0]
    seconds = [p[1] for p in pairs if p[0] == mode]
    assert len(seconds) >= 300, f"too few samples after the most frequent first token ({len(seconds)})"
    r_second = _r_next(tiny_models, "equal", prompt + [mode])
    p_second = chi2_pvalue(np.bincount(seconds, minlength=len(r_second)), r_second)
    assert p_second > P_THRESHOLD, f"second token after {mode}: chi-square p = {p_second:.2e} ({len(seconds)} samples)"
    p_third = _third_token_pvalue(tiny_models, prompt, triples)
    assert p_third > P_THRESHOLD, f"third token given its two before: chi-square p = {p_third:.2e}"
    print(f"\n3-model WE alternate, T=1: first token p = {p_first:.3f} ({NUM_SAMPLES}); "
          f"second token given {mode}: p = {p_second:.3f} ({len(seconds)}); third token p = {p_third:.3f}")

    again = llm.generate([TokensPrompt(prompt_token_ids=prompt)] * 20, params[:20], use_tqdm=False)
    assert [tuple(o.outputs[0].token_ids) for o in again] == triples[:20]  # seeds are exact


@pytest.mark.parametrize("share", [0, 10 ** 6], ids=["void", "refeed"])
def test_unseeded_lazily_scored_drafts_follow_r(engines, tiny_models, tokenizer, prompts, monkeypatch, share):
    """Unseeded requests go through min(1, r/q) (seeded ones race, :mod:`vllm_cos.coupling`):
    the first token and the lazily scored third one follow r, with the rows whose pending
    chain broke (a lazily scored draft or the proposal replaced) all voided or all re-fed at
    the replaced token's own position (``REFEED_SHARE``); greedy stays identical to standard."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_cos.adapters import proposer

    monkeypatch.setattr(proposer, "REFEED_SHARE", share)
    llm = engines.get("equal", "alternate")
    greedy_identity(llm, prompts, MAX_TOKENS, _reference(tiny_models, "equal", prompts), f"alternate share={share}")
    prompt = tokenizer.encode(PROMPT_FOR_SAMPLING, add_special_tokens=False)
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=prompt)] * NUM_SAMPLES, params, use_tqdm=False)
    triples = [tuple(o.outputs[0].token_ids) for o in outs]
    assert all(len(t) == 3 for t in triples)
    r_first = _r_next(tiny_models, "equal", prompt)
    p_first = chi2_pvalue(np.bincount([t[0] for t in triples], minlength=len(r_first)), r_first)
    p_third = _third_token_pvalue(tiny_models, prompt, triples)
    assert p_first > P_THRESHOLD and p_third > P_THRESHOLD, (p_first, p_third)
    print(f"\n3-model WE alternate, T=1, unseeded, share={share}: first token p = {p_first:.3f}; "
          f"third p = {p_third:.3f}")


def test_logprobs_are_log_r_at_every_position(engines, tiny_models, prompts):
    """Sampled (seeded, T = 1) and greedy outputs report the emitted token's logprob of r at every
    position, the lazily scored drafts verified by the proposer included."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_cos.config import load_config

    llm = engines.get("equal", "alternate")
    chosen = [prompts[i] for i in (0, 5, 9, 14)]
    params = [SamplingParams(temperature=1.0 if i < 3 else 0.0, seed=i, max_tokens=MAX_TOKENS, ignore_eos=True,
                             logprobs=5) for i in range(len(chosen))]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in chosen], params, use_tqdm=False)
    cfg = load_config(cos_spec(tiny_models, "equal", "alternate"))
    worst = 0.0
    for prompt, out in zip(chosen, outs):
        gen = out.outputs[0]
        assert len(gen.logprobs) == len(gen.token_ids) == MAX_TOKENS
        log_r = reference_log_r(cfg, prompt + list(gen.token_ids))
        for j, (token, entry) in enumerate(zip(gen.token_ids, gen.logprobs)):
            worst = max(worst, abs(entry[token].logprob - float(log_r[len(prompt) - 1 + j, token])))
    assert worst < 2e-3, f"logprobs differ from log r by {worst}"


def _third_token_pvalue(models, prompt: list[int], triples) -> float:
    """The third token is small's draft, which medium scores lazily (in the next step's first
    pass, verified by the proposer): summed over the samples, its counts must match
    sum_i r(. | prompt + first two tokens of sample i) (chi-square on the summed expectation)."""
    from vllm_cos.config import load_config

    prefixes = sorted({t[:2] for t in triples})
    rows = r_next_rows(load_config(cos_spec(models, "equal", "alternate")), [prompt + list(p) for p in prefixes])
    where = {p: i for i, p in enumerate(prefixes)}
    expected = rows[[where[t[:2]] for t in triples]].sum(dim=0).numpy()
    observed = np.bincount([t[2] for t in triples], minlength=len(expected))
    return chi2_pvalue(observed, expected)


def test_startup_logs_the_kv_share_and_the_draft_plan(engines, startup_log):
    engines.get("equal", "alternate")
    kv = [line for line in startup_log if "KV cache holds" in line]
    assert kv and "for each of the 3 models" in kv[-1], startup_log
    for name in NAMES:
        assert f"{name} " in kv[-1].split("memory split by KV size:")[1]
    assert any("drafts per step: medium, small (draft group medium+small)" in line for line in startup_log)
    assert any("drafts per step: small, small, small" in line for line in startup_log)  # naive, equal


def _perturbed_copy(source: Path, dest: Path, seed: int) -> Path:
    """A different checkpoint with the same tokenizer: ``source`` with noise on every weight."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, dest)
    weights_file = next(dest.glob("*.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    weights = {k: v + 0.05 * v.std().nan_to_num() * torch.randn(v.shape, generator=gen, dtype=v.dtype)
               for k, v in load_file(str(weights_file)).items()}
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    return dest


def test_four_models_greedy_identity(engines, tiny_models, prompts, tmp_path_factory):
    from vllm_cos import reference
    from vllm_cos.config import load_config

    engines.close()  # one engine alive at a time
    fourth = _perturbed_copy(tiny_models["small"], tmp_path_factory.mktemp("four") / "small-b", seed=4)
    models = {**tiny_models, "small-b": fourth}
    names = NAMES + ("small-b",)

    def spec(schedule):
        return {"models": [{"name": n, "path": str(models[n])} for n in names],
                "rule": {"name": "weighted_ensemble", "weights": [0.4, 0.3, 0.2, 0.1]},
                "schedule": schedule, "gamma": [1, 1, 1, 2]}

    four = OneEngine(models["small"], spec)  # served: small; draft group large, medium, small-b (mixed head counts)
    try:
        outputs = {}
        for schedule in ("standard", "alternate"):
            llm = four.get(schedule)
            outputs[schedule] = (_greedy(llm, prompts[:8], batch=False), _greedy(llm, prompts[:8], batch=True))
    finally:
        four.close()
    expected = reference.generate(load_config(spec("standard")), prompts[:8], MAX_TOKENS)
    assert expected != _reference(tiny_models, "unequal", prompts)[:8]  # the fourth model matters
    for schedule, (single, batch) in outputs.items():
        assert single == expected, f"4 models, {schedule}: differs from the reference"
        assert batch == single, f"4 models, {schedule}: a batch of 8 differs from single requests"
