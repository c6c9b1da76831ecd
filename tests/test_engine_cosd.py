"""CoSD inside vLLM: greedy engine output equals the plain-Python CoSD loop.

The tiny models: small drafts (CoSD's draft model, the naive proposer, gamma 3), large is the
assistant and the served model.  Three engines, one alive at a time: naive with each verifier
(rule, tree) and alternate with the rule (the served model's own proposal verified too).  On
each, 20 prompts as single requests and 16 of them as one batch are token-identical to
:func:`vllm_cos.cosd.reference_decode` (draft gamma tokens greedily, one assistant forward,
verify per position, restart after the first replacement) on transformers models.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from engine_helpers import CODE_PROMPTS as TEXTS, OneEngine, greedy_identity

pytestmark = pytest.mark.engine

MAX_TOKENS = 24
GAMMA = 3
# A hand-made tree over (p_draft(x), p_assist(y), p_assist(x), p_draft(y)): y when the draft is
# unsure, the assistant fairly sure, and the assistant gives x little mass.
TREE = {"nodes": [{"feature": 0, "threshold": 0.45, "left": 1, "right": 2}, {"feature": 1, "threshold": 0.3,
                                                                              "left": 3, "right": 4},
                  {"leaf": 0}, {"leaf": 0}, {"feature": 2, "threshold": 0.1, "left": 5, "right": 6},
                  {"leaf": 1}, {"leaf": 0}]}


@pytest.fixture(scope="module")
def tree_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cosd") / "tree.json"
    path.write_text(json.dumps(TREE))
    return path


def cosd_spec(models, tree_path, verifier: str, schedule: str = "naive") -> dict:
    rule = {"name": "cosd", "draft": "small", "assistant": "large", "verifier": verifier}
    if verifier == "tree":
        rule["tree"] = str(tree_path)
    return {"models": [{"name": "large", "path": str(models["large"]), "gamma": 1},
                       {"name": "small", "path": str(models["small"]), "gamma": GAMMA}],
            "rule": rule, "schedule": schedule, "proposer": "small"}


@pytest.fixture(scope="module")
def engines(tiny_models, tree_path):
    e = OneEngine(tiny_models["large"], lambda *key: cosd_spec(tiny_models, tree_path, *key))
    yield e
    e.close()


@pytest.fixture(scope="module")
def prompts(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models["large"]))
    return [tok.encode(t, add_special_tokens=False) for t in TEXTS]


@contextlib.contextmanager
def _one_thread():
    """The reference loop runs many small forwards: one thread (no oversubscription on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_references: dict = {}


def _reference(tiny_models, tree_path, prompts, verifier: str):
    if verifier in _references:
        return _references[verifier]
    from transformers import AutoModelForCausalLM

    from vllm_cos.config import load_config
    from vllm_cos.cosd import reference_decode, verifier_from_rule

    cfg = load_config(cosd_spec(tiny_models, tree_path, verifier))

    def logits_fn(name):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_models[name]), dtype=torch.float32).eval()

        def run(ids):
            with torch.no_grad():
                return model(torch.tensor([ids])).logits[0].float()
        return run

    draft, assistant = logits_fn("small"), logits_fn("large")
    with _one_thread():
        _references[verifier] = [reference_decode(draft, assistant, verifier_from_rule(cfg.rule), p, MAX_TOKENS,
                                                  GAMMA) for p in prompts]
    return _references[verifier]


CASES = [("rule", "naive"), ("tree", "naive"), ("rule", "alternate")]


@pytest.mark.parametrize("verifier,schedule", CASES, ids=[f"{v}-{s}" for v, s in CASES])
def test_greedy_engine_output_is_cosd(engines, tiny_models, tree_path, prompts, verifier, schedule):
    reference = _reference(tiny_models, tree_path, prompts, verifier)
    replaced = sum(o.replaced for o in reference)
    # the verifier matters on these models: it replaces some draft tokens, not all
    assert 0 < replaced < sum(len(o.token_ids) for o in reference) // 2, replaced
    llm = engines.get(verifier, schedule)
    greedy_identity(llm, prompts, MAX_TOKENS, [o.token_ids for o in reference], f"cosd/{verifier}/{schedule}")
