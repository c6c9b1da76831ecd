import pytest
import torch

from vllm_cos.combine import build_combiner, contrastive, weighted_ensemble
from vllm_cos.config import RuleSpec


def _logits(seed, shape=(2, 3, 7)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_weighted_ensemble_is_the_mixture():
    member_logits = _logits(0)  # [2 models, 3 tokens, vocab 7]
    combined = weighted_ensemble(member_logits, torch.tensor([0.25, 0.75]))
    expected = 0.25 * torch.softmax(member_logits[0], -1) + 0.75 * torch.softmax(member_logits[1], -1)
    assert torch.allclose(torch.softmax(combined, -1), expected, atol=1e-6)
    # all weight on one model reproduces that model exactly
    one = weighted_ensemble(member_logits, torch.tensor([1.0, 0.0]))
    assert torch.allclose(torch.softmax(one, -1), torch.softmax(member_logits[0], -1), atol=1e-6)


def test_contrastive_on_raw_logits_keeps_masks():
    member_logits = _logits(1)
    member_logits[1, 0, 3] = float("-inf")
    combined = contrastive(member_logits, expert=0, amateur=1, mu=0.1)
    assert torch.isinf(combined[0, 3])
    finite = torch.isfinite(combined)
    assert torch.allclose(combined[finite], (member_logits[0] - 0.1 * member_logits[1])[finite])


def _product_of_experts(member_probs, power=1.0):
    return member_probs.prod(0) ** power


def test_registry_builds_rules_in_model_order():
    member_logits = _logits(2)
    we = build_combiner(RuleSpec(name="weighted_ensemble", weights={"b": 0.2, "a": 0.8}), ["a", "b"])
    assert torch.allclose(we(member_logits), weighted_ensemble(member_logits, torch.tensor([0.8, 0.2])))
    cd = build_combiner(RuleSpec(name="contrastive", expert="b", amateur="a", mu=0.3), ["a", "b"])
    assert torch.allclose(cd(member_logits), member_logits[1] - 0.3 * member_logits[0])
    custom = build_combiner(RuleSpec(name="custom", function="test_combine:_product_of_experts",
                                     inputs="probs", params={"power": 0.5}), ["a", "b"])
    expected = (torch.softmax(member_logits, -1).prod(0) ** 0.5).log()
    assert torch.allclose(custom(member_logits), expected, atol=1e-5)
    on_logits = build_combiner(RuleSpec(name="custom", function="test_combine:_mean_logits",
                                        inputs="logits"), ["a", "b"])
    assert torch.allclose(on_logits(member_logits), member_logits.mean(0))


def _mean_logits(member_logits):
    return member_logits.mean(0)


def test_custom_rule_with_a_wrong_shape_is_named():
    bad = build_combiner(RuleSpec(name="custom", function="torch:sum", inputs="logits"), ["a", "b"])
    with pytest.raises(ValueError, match=r"custom rule torch:sum: must return \[num_tokens, vocab\]"):
        bad(_logits(3))


def test_unknown_import_path_is_reported():
    with pytest.raises(ValueError, match="cannot import"):
        build_combiner(RuleSpec(name="custom", function="nope_mod:f", inputs="probs"), ["a", "b"])


def test_registry_builds_cosd_in_model_order():
    from vllm_cos.combine import RULES
    from vllm_cos.cosd import RuleVerifier, cosd_log_r

    member_logits = _logits(4, shape=(2, 50, 7)) * 2
    cosd = build_combiner(RuleSpec(name="cosd", draft="b", assistant="a", alpha=0.8, beta=0.3), ["a", "b"])
    log_r = cosd(member_logits)
    assert "cosd" in RULES and torch.equal(log_r, cosd_log_r(member_logits, 1, 0, RuleVerifier(0.8, 0.3)))
    assert ((log_r == 0).sum(-1) == 1).all() and ((log_r < -1e3).sum(-1) == 6).all()
    assert (torch.softmax(log_r, -1).max(-1).values == 1.0).all()  # one-hot r
    assert not torch.equal(log_r.argmax(-1), member_logits[1].argmax(-1))  # some draft tokens replaced
