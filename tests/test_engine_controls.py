"""Every request control under ``naive`` / ``alternate`` behaves as under ``standard``.

``standard`` is the behavioural reference: vLLM's stock sampler processes log r there.  For
each control a user can put in ``SamplingParams`` (structured outputs: regex, choice, JSON
schema, grammar; min_tokens with stop tokens; bad_words; allowed_token_ids; logit_bias;
min_p; repetition / presence / frequency penalties):

* greedy: token-identical to ``standard``, one request at a time and as one batch of 16 that
  mixes every control (2 models WE and CD, 3 models WE under alternate and naive -- both
  score lazily, vllm_cos.lazy --, and WE with `gamma: auto`, whose drafts per step vary);
* every structured-output completion is valid, greedy and sampled (T = 1, seeded);
* at T = 1 the first two tokens under a ``choice`` constraint and under ``min_p`` follow the
  same distribution as ``standard``'s (two-sample chi-square over seeded requests).
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from engine_helpers import CODE_PROMPTS, OneEngine

pytestmark = pytest.mark.engine

MAX_TOKENS = 20
NUM_SAMPLES = 1500
P_THRESHOLD = 1e-3
REGEX = r"(def|class) [a-z_]{2,10}\((self|x|y)?\):"
CHOICES = ["True", "False", "None", "self.value", "return x"]
SCHEMA = {"enum": ["alpha", "beta gamma", 7, None]}  # no whitespace to loop in (tiny models would)
GRAMMAR = 'root ::= "x = " num\nnum ::= [0-9] [0-9]?'
RULES = {
    "we": {"name": "weighted_ensemble", "weights": {"large": 0.5, "small": 0.5}},
    "cd": {"name": "contrastive", "expert": "large", "amateur": "small", "mu": 0.5},
    "we3": {"name": "weighted_ensemble", "weights": {"large": 0.5, "medium": 0.3, "small": 0.2}},
}


def cos_spec(models, rule: str, schedule: str) -> dict:
    """``schedule`` "auto" = alternate with ``gamma: auto`` (the drafts per step vary)."""
    names = ["large", "medium", "small"] if rule == "we3" else ["large", "small"]
    gamma = {"large": 1, "medium": 1, "small": 2 if rule == "we3" else 3}
    spec = {"models": [{"name": n, "path": str(models[n]), "gamma": gamma[n]} for n in names],
            "rule": RULES[rule], "schedule": schedule, "proposer": "small"}
    if schedule == "auto":
        spec.update(schedule="alternate", gamma="auto", models=[{"name": n, "path": str(models[n])} for n in names])
    return spec


@pytest.fixture(scope="module")
def engines(tiny_models):
    e = OneEngine(tiny_models["large"], lambda *key: cos_spec(tiny_models, *key))
    yield e
    e.close()


@pytest.fixture(scope="module")
def tok(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_models["large"]))


def controls(tok) -> dict[str, dict]:
    """name -> SamplingParams keyword arguments (on top of temperature / max_tokens)."""
    from vllm.sampling_params import StructuredOutputsParams as SO

    newline = tok.encode("\n", add_special_tokens=False)[0]
    colon = tok.encode(":", add_special_tokens=False)[0]
    common = [tok.encode(w, add_special_tokens=False)[0] for w in (" ", "self", "(", ")", "_", "e", "t")]
    return {
        "regex": {"structured_outputs": SO(regex=REGEX), "max_tokens": 40},
        "choice": {"structured_outputs": SO(choice=CHOICES), "max_tokens": 40},
        "json": {"structured_outputs": SO(json=SCHEMA), "max_tokens": 40},
        "grammar": {"structured_outputs": SO(grammar=GRAMMAR), "max_tokens": 40},
        "min_tokens": {"min_tokens": 12, "stop_token_ids": [newline, colon]},
        "bad_words": {"bad_words": ["self", " return"]},
        "allowed": {"allowed_token_ids": list(range(0, 120)) + common},
        "logit_bias": {"logit_bias": {newline: -100.0, common[1]: 4.0, common[4]: 2.5}},
        "min_p": {"min_p": 0.2},
        "penalties": {"repetition_penalty": 1.4, "presence_penalty": 0.6, "frequency_penalty": 0.4},
    }


def valid(name: str, text: str) -> bool:
    if name == "regex":
        return re.fullmatch(REGEX, text) is not None
    if name == "choice":
        return text in CHOICES
    if name == "json":
        try:
            value = json.loads(text)
        except ValueError:
            return False
        return value in SCHEMA["enum"]
    if name == "grammar":
        return re.fullmatch(r"x = [0-9][0-9]?", text) is not None
    return True


def run(llm, prompt_ids, kwargs_list, temperature=0.0, seeds=None, max_tokens=MAX_TOKENS):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(temperature=temperature, seed=None if seeds is None else seeds[i],
                             **{"max_tokens": max_tokens, **kw}) for i, kw in enumerate(kwargs_list)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.outputs[0].text) for o in outs]


def greedy_runs(llm, tok):
    """(per control: outputs of 3 prompts one at a time, outputs of one batch of 16 mixing all)."""
    table = controls(tok)
    prompts = [tok.encode(t, add_special_tokens=False) for t in CODE_PROMPTS]
    singles = {name: [run(llm, [p], [kw])[0] for p in prompts[:3]] for name, kw in table.items()}
    names = list(table)
    mixed = [names[i % len(names)] for i in range(16)]
    batch = run(llm, prompts[:16], [table[n] for n in mixed])
    return singles, list(zip(mixed, batch))


_reference: dict = {}
GREEDY_ORDER = [("we", "standard"), ("we", "alternate"), ("we", "naive"), ("we", "auto"), ("we3", "standard"),
                ("we3", "alternate"), ("we3", "naive"), ("cd", "standard"), ("cd", "alternate"), ("cd", "auto")]


@pytest.mark.parametrize("rule,schedule", GREEDY_ORDER, ids=[f"{r}-{s}" for r, s in GREEDY_ORDER])
def test_greedy_controls_identical_to_standard(engines, tok, forced_draft_lengths, rule, schedule):
    singles, batch = greedy_runs(engines.get(rule, schedule), tok)
    for name, outs in singles.items():
        assert all(valid(name, text) for _, text in outs), f"{rule}/{schedule} {name}: invalid {outs}"
    for name, (_, text) in batch:
        assert valid(name, text), f"{rule}/{schedule} batch {name}: invalid {text!r}"
    if schedule == "auto":
        _assert_seed_reproduces_under_load(engines.get(rule, schedule), tok, forced_draft_lengths)
        _assert_fused_steps_give_standard(engines.get(rule, schedule), tok, forced_draft_lengths, rule)
    if schedule == "standard":
        _reference[rule] = singles, batch
        return
    ref_singles, ref_batch = _reference[rule]
    for name in singles:
        got, want = [t for t, _ in singles[name]], [t for t, _ in ref_singles[name]]
        assert got == want, f"{rule}/{schedule}: {name} differs from standard"
    assert [t for _, (t, _) in batch] == [t for _, (t, _) in ref_batch], \
        f"{rule}/{schedule}: the mixed batch of 16 differs from standard"


# gamma: auto with the controller's choice forced (in-process engine): every step 0 drafts, so
# every step after the first is fused (vllm_cos.adapters.fusion), or a pattern that moves
# between fused steps and drafting ones (the drafting step after a fused one re-feeds first).
FORCED = {"fused": [0], "fused-mixed": [0, 0, 3, 0, 1, 0, 0, 4, 2]}


@pytest.fixture
def forced_draft_lengths(monkeypatch):
    import itertools

    from vllm_cos.adaptive import DraftLengthController

    def force(name: str) -> None:
        ks = itertools.cycle(FORCED[name])
        monkeypatch.setattr(DraftLengthController, "choose", lambda self, batch: min(next(ks), self.max_drafts))
    return force


def _fused_steps(llm) -> int:
    from vllm_cos.offline import cos_stats

    return sum(s["fused_steps"] for s in cos_stats(llm) if s)


def _assert_fused_steps_give_standard(llm, tok, force, rule):
    """Verify-only steps fused into the served forward give standard's text under every
    control, all fused and mixed with drafting steps."""
    ref_singles, ref_batch = _reference[rule]
    for pattern in FORCED:
        force(pattern)
        before = _fused_steps(llm)
        singles, batch = greedy_runs(llm, tok)
        assert _fused_steps(llm) - before >= 60, f"{pattern}: the forced 0-draft steps were not fused"
        for name in singles:
            got, want = [t for t, _ in singles[name]], [t for t, _ in ref_singles[name]]
            assert got == want, f"{rule}/{pattern}: {name} differs from standard"
        assert [t for _, (t, _) in batch] == [t for _, (t, _) in ref_batch], \
            f"{rule}/{pattern}: the mixed batch of 16 differs from standard"


def test_fused_second_token_is_r(engines, tok, forced_draft_lengths, tiny_models):
    """Fused steps draw from r: the second token of NUM_SAMPLES requests (one batch; unseeded,
    then one seed each) follows its marginal under r (chi-square), all fused and mixed with
    drafting steps."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from engine_helpers import r_second_token
    from stats import chi2_pvalue
    from vllm_cos.config import load_config

    llm = engines.get("cd", "auto")
    prompt = tok.encode("    if x is ", add_special_tokens=False)
    expected = r_second_token(load_config(cos_spec(tiny_models, "cd", "auto")), prompt).numpy()
    for pattern, seeded in [(p, s) for p in FORCED for s in (False, True)]:
        forced_draft_lengths(pattern)
        before = _fused_steps(llm)
        params = [SamplingParams(temperature=1.0, max_tokens=2, ignore_eos=True, seed=i if seeded else None)
                  for i in range(NUM_SAMPLES)]  # seeded: position-keyed races, one seed per request
        outs = llm.generate([TokensPrompt(prompt_token_ids=prompt)] * NUM_SAMPLES, params, use_tqdm=False)
        assert _fused_steps(llm) > before, f"{pattern}: no step was fused"
        counts = Counter(o.outputs[0].token_ids[1] for o in outs)
        observed = [counts.get(t, 0) for t in range(len(expected))]
        p_value = chi2_pvalue(observed, expected)
        assert p_value > P_THRESHOLD, f"{pattern} (seeded {seeded}): second token, chi-square p = {p_value:.2e}"


def test_fused_steps_report_logprobs_of_r(engines, tok, forced_draft_lengths, tiny_models):
    """Every generated token's logprob (and the clear top-5) in fused steps is log r there."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from engine_helpers import reference_log_r
    from vllm_cos.config import load_config

    llm = engines.get("cd", "auto")
    cfg = load_config(cos_spec(tiny_models, "cd", "auto"))
    forced_draft_lengths("fused")
    prompts = [tok.encode(t, add_special_tokens=False) for t in CODE_PROMPTS[:3]]
    params = SamplingParams(temperature=1.0, max_tokens=12, logprobs=5, ignore_eos=True)
    before = _fused_steps(llm)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], [params] * 3, use_tqdm=False)
    assert _fused_steps(llm) - before >= 11
    worst = 0.0
    for prompt, out in zip(prompts, outs):
        gen = out.outputs[0]
        log_r = reference_log_r(cfg, prompt + list(gen.token_ids))
        for j, (token, entry) in enumerate(zip(gen.token_ids, gen.logprobs)):
            ref = log_r[len(prompt) - 1 + j]
            values, indices = torch.topk(ref, 6)
            clear = {t for t, v in zip(indices[:5].tolist(), values[:5].tolist()) if v - float(values[5]) > 1e-3}
            assert token in entry and clear <= set(entry), (j, clear, set(entry))
            worst = max([worst] + [abs(entry[t].logprob - float(ref[t])) for t in clear | {token}])
    assert worst < 2e-3, f"fused-step logprobs differ from log r by {worst}"


def test_prompt_logprobs_are_log_r_while_steps_fuse(engines, tok, forced_draft_lengths, tiny_models):
    """A prompt-logprobs request is never fused (its scores come from the proposer's first pass):
    with every step forced to 0 drafts, its prompt logprobs are still log r."""
    from engine_helpers import assert_prompt_logprobs_are_log_r, reference_log_r
    from vllm_cos.config import load_config

    llm = engines.get("cd", "auto")
    cfg = load_config(cos_spec(tiny_models, "cd", "auto"))
    forced_draft_lengths("fused")
    prompts = [tok.encode(t, add_special_tokens=False) for t in CODE_PROMPTS[:3]]
    assert_prompt_logprobs_are_log_r(llm, prompts, lambda prompt: reference_log_r(cfg, prompt))


def _assert_seed_reproduces_under_load(llm, tok, force):
    """gamma: auto picks each step's drafts from the load; a seeded request's text must not
    depend on it (vllm_cos.coupling): alone, among 15 unseeded requests, and with the draft
    lengths forced (every step fused, or fused steps mixed with drafting ones), it is the same."""
    from vllm import SamplingParams

    prompt = tok.encode("def parse(line):\n    ", add_special_tokens=False)
    seeded = SamplingParams(temperature=1.0, seed=99, max_tokens=40, ignore_eos=True)
    others = SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True)
    alone = run_params(llm, [prompt], [seeded])[0]
    crowd = run_params(llm, [prompt] * 16, [others] * 8 + [seeded] + [others] * 7)
    assert crowd[8] == alone and run_params(llm, [prompt], [seeded])[0] == alone
    for pattern in FORCED:
        force(pattern)
        crowd = run_params(llm, [prompt] * 16, [others] * 3 + [seeded] + [others] * 12)
        assert crowd[3] == alone and run_params(llm, [prompt], [seeded])[0] == alone, pattern


def run_params(llm, prompts, params):
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _first_two(llm, tok, kwargs, seeds, prompt):
    outs = run(llm, [prompt] * len(seeds), [kwargs] * len(seeds), temperature=1.0, seeds=seeds, max_tokens=2)
    return outs


def _homogeneity_p(a: Counter, b: Counter) -> float:
    from scipy.stats import chi2_contingency

    keys = [k for k in set(a) | set(b) if a.get(k, 0) + b.get(k, 0) >= 10]
    rest = [sum(c.get(k, 0) for k in set(c) - set(keys)) for c in (a, b)]
    table = [[a.get(k, 0) for k in keys], [b.get(k, 0) for k in keys]]
    if min(rest) >= 5:
        table[0].append(rest[0])
        table[1].append(rest[1])
    return float(chi2_contingency(table)[1])


SAMPLING_ORDER = [("we", "standard"), ("we", "alternate")]
_samples: dict = {}


@pytest.mark.parametrize("rule,schedule", SAMPLING_ORDER, ids=[f"{r}-{s}" for r, s in SAMPLING_ORDER])
def test_first_two_tokens_follow_standard_under_choice_and_min_p(engines, tok, rule, schedule):
    llm = engines.get(rule, schedule)
    table = controls(tok)
    prompt = tok.encode("    if x is ", add_special_tokens=False)
    offset = 0 if schedule == "standard" else NUM_SAMPLES  # independent seeds per engine
    seeds = list(range(offset, offset + NUM_SAMPLES))
    got = {}
    for name in ("choice", "min_p"):
        outs = _first_two(llm, tok, table[name], seeds, prompt)
        if name == "choice":  # every sampled completion is a valid prefix of a choice
            assert all(any(c.startswith(text) for c in CHOICES) for _, text in outs)
        got[name] = {"first": Counter(t[0] for t, _ in outs), "pair": Counter(tuple(t[:2]) for t, _ in outs)}
    _samples[schedule] = got
    if schedule == "standard":
        return
    for name in ("choice", "min_p"):
        for which in ("first", "pair"):
            p = _homogeneity_p(_samples["standard"][name][which], got[name][which])
            assert p > P_THRESHOLD, f"{name}: {which} token(s) differ from standard (p = {p:.2e})"


def test_sampled_structured_outputs_are_all_valid(engines, tok):
    """Alternate, T = 1, seeded: every regex / choice / JSON / grammar completion is valid."""
    llm = engines.get("we", "alternate")
    table = controls(tok)
    prompts = [tok.encode(t, add_special_tokens=False) for t in CODE_PROMPTS[:8]]
    for name in ("regex", "choice", "json", "grammar"):
        outs = run(llm, prompts * 4, [table[name]] * 32, temperature=1.0, seeds=list(range(32)))
        bad = [text for _, text in outs if not valid(name, text)]
        assert not bad, f"{name}: {len(bad)}/32 invalid, e.g. {bad[:2]}"
