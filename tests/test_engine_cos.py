"""CoS inside vLLM (offline ``LLM``): greedy identity and first-token distribution.

For each rule (weighted ensemble, contrastive) one engine per schedule is started
(standard, naive, alternate; one engine alive at a time):

* greedy: 20 prompts as single requests and 16 of them as one batch; naive and alternate are
  token-identical to the engine's standard mode and to ``vllm_cos.reference.generate``;
* sampling (alternate engine): the first generated token over many seeded requests follows
  r = C(p_large, p_small) tempered (chi-square), r computed with transformers models.
"""

from __future__ import annotations

import gc
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.engine

MAX_TOKENS = 24
NUM_SAMPLES = 3000
P_THRESHOLD = 1e-3
RULES = {
    "we": {"name": "weighted_ensemble", "weights": {"large": 0.5, "small": 0.5}},
    "cd": {"name": "contrastive", "expert": "large", "amateur": "small", "mu": 0.5},
}
TEXTS = [
    "def main(", "import os\nimport sys\n", "class Foo:\n    def __init__(self", "for i in range(10):\n",
    "return self.", "if __name__ == '__main__':\n", "    def __repr__(self):\n        return ", "x = [",
    "from collections import ", "try:\n    ", "with open(path) as f:\n", "raise ValueError(",
    "    @property\n    def ", "print(", "while True:\n    ", "lambda x: ", "assert isinstance(",
    "elif ", "yield from ", "self.assertEqual(",
]
PROMPT_FOR_SAMPLING = "import os\nimport sys\n\n\ndef main():\n    "


@pytest.fixture(scope="module")
def models(request) -> dict[str, Path]:
    try:
        return request.getfixturevalue("tiny_models")
    except pytest.FixtureLookupError:
        shared = Path("/work/shared/models")
        if (shared / "large").is_dir():  # until conftest's tiny_models exists
            return {"large": shared / "large", "medium": shared / "expert-a", "small": shared / "small"}
        pytest.skip("no tiny models (tiny_models fixture missing)")


def cos_spec(models, rule: str, schedule: str) -> dict:
    return {"models": [{"name": "large", "path": str(models["large"]), "gamma": 1},
                       {"name": "small", "path": str(models["small"]), "gamma": 3}],
            "rule": RULES[rule], "schedule": schedule}


class Engines:
    """At most one engine alive; started on demand."""

    def __init__(self, models):
        self.models = models
        self.key = None
        self.llm = None

    def get(self, rule: str, schedule: str):
        if self.key != (rule, schedule):
            self.close()
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            from vllm import LLM

            self.llm = LLM(model=str(self.models["large"]), speculative_config=cos_spec(self.models, rule, schedule),
                           dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=64,
                           gpu_memory_utilization=0.2, seed=0, enable_prefix_caching=False)
            self.key = (rule, schedule)
        return self.llm

    def close(self):
        if self.llm is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            self.llm = None
            self.key = None
            gc.collect()


@pytest.fixture(scope="module")
def engines(models):
    e = Engines(models)
    yield e
    e.close()


@pytest.fixture(scope="module")
def prompts(models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models["large"]))
    return [tok.encode(t, add_special_tokens=False) for t in TEXTS]


_results: dict = {}


def _greedy(llm, prompts, batch: bool):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    if batch:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]
    return [list(llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)[0].outputs[0].token_ids)
            for p in prompts]


def _reference(models, rule, prompts):
    key = ("reference", rule)
    if key not in _results:
        from vllm_cos import reference
        from vllm_cos.config import load_config

        cfg = load_config(cos_spec(models, rule, "standard"))
        _results[key] = reference.generate(cfg, prompts, MAX_TOKENS)
    return _results[key]


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("schedule", ["standard", "naive", "alternate"])
def test_greedy_identity(engines, models, prompts, rule, schedule):
    llm = engines.get(rule, schedule)
    single = _greedy(llm, prompts, batch=False)
    batch = _greedy(llm, prompts[:16], batch=True)
    _results[(rule, schedule)] = single
    expected = _reference(models, rule, prompts)
    mismatches = [i for i, (a, b) in enumerate(zip(single, expected)) if a != b]
    assert not mismatches, f"{schedule}/{rule}: prompts {mismatches} differ from the reference"
    assert batch == single[:16], f"{schedule}/{rule}: a batch of 16 differs from single requests"
    if (rule, "standard") in _results:
        assert single == _results[(rule, "standard")]


def _expected_first_token(models, rule, prompt, temperature, top_k, top_p):
    from transformers import AutoModelForCausalLM

    from vllm_cos.combine import build_combiner
    from vllm_cos.config import load_config
    from vllm_cos.sampling import apply_sampling_params

    cfg = load_config(cos_spec(models, rule, "alternate"))
    logits = []
    for name in cfg.model_names:
        model = AutoModelForCausalLM.from_pretrained(str(models[name]), dtype=torch.float32)
        with torch.no_grad():
            logits.append(model(torch.tensor([prompt])).logits[0, -1])
    combined = build_combiner(cfg.rule, cfg.model_names)(torch.stack(logits).unsqueeze(1))
    return apply_sampling_params(combined, torch.tensor([temperature]), torch.tensor([top_k]),
                                 torch.tensor([top_p]))[0].double()


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


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("sampling", [(1.0, 0, 1.0), (0.7, 20, 0.9)], ids=["T1", "T0.7_k20_p0.9"])
def test_first_token_distribution_is_r(engines, models, rule, sampling):
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    temperature, top_k, top_p = sampling
    tok = AutoTokenizer.from_pretrained(str(models["large"]))
    prompt = tok.encode(PROMPT_FOR_SAMPLING, add_special_tokens=False)
    llm = engines.get(rule, "alternate")
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
