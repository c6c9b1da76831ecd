"""CoS (alternate, weighted ensemble) under vLLM's scheduler features: one engine with prefix
caching on, chunked prefill with a small token budget (max_num_batched_tokens=64) and a tiny
KV cache (num_gpu_blocks_override) that forces preemption.  Greedy outputs stay token-identical
to the reference (``vllm_cos.reference.generate``) in every case.
"""

from __future__ import annotations

import os

import pytest
from engine_helpers import CODE_PROMPTS, assert_prompt_logprobs_are_log_r, reference_log_r

from vllm_cos.config import load_config
from vllm_cos.offline import shutdown_llm

pytestmark = pytest.mark.engine

BLOCK_SIZE = 32
NUM_BLOCKS = 12  # 384 token slots for 16 requests that each grow past one block: preemption
MAX_TOKENS = 40
TEXTS = CODE_PROMPTS[:16]
SHARED_PREFIX = ("import os\nimport sys\nimport json\n\n\nclass Config:\n    def __init__(self, path):\n"
                 "        self.path = path\n        self.values = {}\n\n    def load(self):\n"
                 "        with open(self.path) as f:\n            self.values = json.load(f)\n")


def _spec(models):
    return {"models": [{"name": "large", "path": str(models["large"]), "gamma": 1},
                       {"name": "small", "path": str(models["small"]), "gamma": 3}],
            "rule": {"name": "weighted_ensemble", "weights": {"large": 0.5, "small": 0.5}},
            "schedule": "alternate"}


@pytest.fixture(scope="module")
def llm(tiny_models):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    engine = LLM(model=str(tiny_models["large"]), speculative_config=_spec(tiny_models), dtype="float32",
                 enforce_eager=True, max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64,
                 enable_chunked_prefill=True, enable_prefix_caching=True, block_size=BLOCK_SIZE,
                 num_gpu_blocks_override=NUM_BLOCKS, gpu_memory_utilization=0.2, seed=0,
                 disable_log_stats=False)
    yield engine
    shutdown_llm(engine)


@pytest.fixture(scope="module")
def tok(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_models["large"]))


def _reference(models, prompts, max_tokens):
    from vllm_cos import reference
    from vllm_cos.config import load_config

    cfg = load_config({**_spec(models), "schedule": "standard"})
    return reference.generate(cfg, prompts, max_tokens)


def _greedy(llm, prompts, max_tokens):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


def _num_preemptions(llm) -> int:
    total = 0
    for metric in llm.get_metrics():
        if metric.name == "vllm:num_preemptions":
            total += int(getattr(metric, "value", 0))
    return total


def test_preemption_keeps_greedy_identity(llm, tiny_models, tok):
    prompts = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    before = _num_preemptions(llm)
    outs = _greedy(llm, prompts, MAX_TOKENS)
    preempted = _num_preemptions(llm) - before
    expected = _reference(tiny_models, prompts, MAX_TOKENS)
    got = [list(o.outputs[0].token_ids) for o in outs]
    mismatches = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    assert not mismatches, f"prompts {mismatches} differ from the reference (preemptions: {preempted})"
    assert preempted > 0, "the tiny KV cache did not force any preemption"


def test_prefix_caching_shared_prefix(llm, tiny_models, tok):
    prefix = tok.encode(SHARED_PREFIX, add_special_tokens=False)
    assert len(prefix) > 2 * BLOCK_SIZE
    prompts = [prefix + tok.encode(t, add_special_tokens=False) for t in TEXTS[:6]]
    expected = _reference(tiny_models, prompts, 24)
    first = _greedy(llm, prompts[:1], 24)  # fills the cache with the shared prefix
    rest = _greedy(llm, prompts[1:], 24)
    got = [list(o.outputs[0].token_ids) for o in first + rest]
    assert got == expected
    assert all((o.num_cached_tokens or 0) >= BLOCK_SIZE for o in rest), [o.num_cached_tokens for o in rest]


def test_chunked_prefill_long_prompt(llm, tiny_models, tok):
    text = "".join(f"{t}pass\n" for t in TEXTS) * 2
    long_prompt = tok.encode(text, add_special_tokens=False)[:200]
    assert len(long_prompt) > 3 * 64  # several prefill chunks of max_num_batched_tokens
    prompts = [long_prompt, tok.encode(TEXTS[0], add_special_tokens=False)]
    expected = _reference(tiny_models, prompts, 24)
    got = [list(o.outputs[0].token_ids) for o in _greedy(llm, prompts, 24)]
    assert got == expected
    # prompt logprobs of r, the long prompt scored over several prefill chunks
    cfg = load_config(_spec(tiny_models))
    assert_prompt_logprobs_are_log_r(llm, prompts, lambda ids: reference_log_r(cfg, ids))
