"""vllm_cos.overrides: per-request collaboration settings (validation, batch tensors) and the
combination rules' per-row parameters (pure tensor math)."""

from __future__ import annotations

import pytest
import torch

from vllm_cos.combine import build_combiner
from vllm_cos.config import load_config
from vllm_cos.overrides import BatchOverrides, OverrideError, RequestOverride, parse_request


@pytest.fixture
def we(tiny_models):
    return load_config({"models": [{"name": n, "path": str(tiny_models[n])} for n in ("large", "medium", "small")],
                        "rule": {"name": "weighted_ensemble", "weights": [0.5, 0.3, 0.2]}})


@pytest.fixture
def cd(tiny_models):
    return load_config({"models": [{"name": n, "path": str(tiny_models[n])} for n in ("large", "small")],
                        "rule": {"name": "contrastive", "expert": "large", "amateur": "small", "mu": 0.1}})


def test_valid_settings(we, cd):
    assert parse_request(None, we) is None and parse_request({"other_plugin": 1}, we) is None
    assert parse_request({"cos_weights": [0.2, 0.3, 0.5]}, we) == RequestOverride(weights=(0.2, 0.3, 0.5))
    by_name = parse_request({"cos_weights": {"small": 0.5, "large": 0.25, "medium": 0.25}}, we)
    assert by_name.weights == (0.25, 0.25, 0.5)
    assert parse_request({"cos_mu": 0.5, "cos_speculate": 0}, cd) == RequestOverride(mu=0.5, speculate=False)
    assert parse_request({"cos_speculate": 1}, cd) == RequestOverride()


@pytest.mark.parametrize("extra, field, words", [
    ({"cos_weight": [1, 0, 0]}, "cos_weight", "unknown CoS setting"),
    ({"cos_weights": [0.5, 0.5]}, "cos_weights", "list of 3 numbers"),
    ({"cos_weights": "0.5,0.5,0"}, "cos_weights", "list of 3 numbers"),
    ({"cos_weights": [0.5, 0.6, -0.1]}, "cos_weights", "must be >= 0"),
    ({"cos_weights": [0.5, 0.4, 0.2]}, "cos_weights", "must sum to 1, got 1.1"),
    ({"cos_weights": [0.5, "0.3", 0.2]}, "cos_weights[1]", "finite number"),
    ({"cos_weights": [0.5, float("nan"), 0.5]}, "cos_weights[1]", "finite number"),
    ({"cos_weights": {"large": 0.5, "medium": 0.5}}, "cos_weights", "no weight for model 'small'"),
    ({"cos_weights": {"large": 0.5, "huge": 0.5, "small": 0}}, "cos_weights", "'huge' is not one of the models"),
    ({"cos_mu": 0.3}, "cos_mu", "only for rule contrastive"),
    ({"cos_speculate": 2}, "cos_speculate", "must be 1 or 0"),
    ({"cos_speculate": True}, "cos_speculate", "must be 1 or 0"),
])
def test_invalid_settings_name_the_field(we, extra, field, words):
    with pytest.raises(OverrideError) as err:
        parse_request(extra, we)
    assert err.value.field == field and str(err.value).startswith(f"{field}: ") and words in str(err.value)


@pytest.mark.parametrize("extra, field, words", [
    ({"cos_mu": -1}, "cos_mu", ">= 0"), ({"cos_mu": "big"}, "cos_mu", "finite number"),
    ({"cos_weights": [0.5, 0.5]}, "cos_weights", "only for rule weighted_ensemble"),
])
def test_invalid_contrastive_settings(cd, extra, field, words):
    with pytest.raises(OverrideError) as err:
        parse_request(extra, cd)
    assert err.value.field == field and words in str(err.value)


def test_batch_rows_equal_separate_combinations(we, cd):
    """A batch whose rows carry different weights (or mu) combines each row as a combiner built
    with that row's parameters would."""
    member_logits = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0))  # [M, N, V]
    per_request = [None, parse_request({"cos_weights": [0.1, 0.1, 0.8]}, we), None,
                   parse_request({"cos_weights": [1.0, 0.0, 0.0]}, we)]
    batch = BatchOverrides.build(per_request, we, "cpu")
    assert batch.weights.shape == (4, 3) and batch.mu is None and batch.no_speculation is None
    rows = torch.tensor([3, 0, 1, 1])  # rows of requests 3, 0, 1, 1
    got = build_combiner(we.rule, we.model_names)(member_logits, **batch.rows(rows))
    for n, request in enumerate(rows.tolist()):
        weights = per_request[request].weights if per_request[request] else (0.5, 0.3, 0.2)
        rule = type(we.rule)(name="weighted_ensemble", weights=dict(zip(we.model_names, weights)))
        want = build_combiner(rule, we.model_names)(member_logits[:, n: n + 1])[0]
        assert torch.allclose(got[n], want, atol=1e-6)
    cd_logits = member_logits[:2]
    cd_batch = BatchOverrides.build([parse_request({"cos_mu": 0.7, "cos_speculate": 0}, cd), None], cd, "cpu")
    assert cd_batch.no_speculation.tolist() == [True, False]
    got = build_combiner(cd.rule, cd.model_names)(cd_logits[:, :2], **cd_batch.rows(torch.tensor([0, 1])))
    assert torch.allclose(got[0], cd_logits[0, 0] - 0.7 * cd_logits[1, 0])
    assert torch.allclose(got[1], cd_logits[0, 1] - 0.1 * cd_logits[1, 1])


def test_a_batch_without_settings_is_none(we):
    assert BatchOverrides.build([None, None], we, "cpu") is None
    only_speculate = BatchOverrides.build([RequestOverride(speculate=False), None], we, "cpu")
    assert only_speculate.weights is None and only_speculate.rows(torch.tensor([0, 1])) == {}
