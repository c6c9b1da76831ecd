"""What a CoS speculative engine accepts per request, and the logits processors it is built with."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_cos.adapters.request_checks import check_for_cos, is_cos_speculative
from vllm_cos.adapters.spec_decode import logitsprocs_hook


def test_only_cos_speculative_engines_lift_the_refusal():
    cos = {"cos": {"models": []}}
    assert is_cos_speculative(SimpleNamespace(additional_config=cos, speculative_config=object()))
    assert not is_cos_speculative(SimpleNamespace(additional_config=cos, speculative_config=None))  # standard
    assert not is_cos_speculative(SimpleNamespace(additional_config={}, speculative_config=object()))


def test_thinking_budget_is_refused_naming_the_parameter():
    from vllm.exceptions import VLLMValidationError

    check_for_cos(SimpleNamespace(thinking_token_budget=None, min_p=0.3, logit_bias={1: 2.0}))  # allowed
    with pytest.raises(VLLMValidationError, match="thinking_token_budget") as info:
        check_for_cos(SimpleNamespace(thinking_token_budget=8))
    assert info.value.parameter == "thinking_token_budget"


def test_cos_engines_get_the_builtin_processors_and_refuse_custom_ones(tiny_models, monkeypatch):
    from vllm.v1.sample.logits_processor import BUILTIN_LOGITS_PROCESSORS

    cfg = {"models": [{"name": "large", "path": str(tiny_models["large"])},
                      {"name": "small", "path": str(tiny_models["small"])}],
           "rule": {"name": "weighted_ensemble"}, "schedule": "alternate", "tokenizer_size": 512}
    seen = []

    class Custom:
        pass

    def stock(vllm_config, device, pin, pooling, custom=()):
        seen.append(vllm_config.speculative_config)
        procs = [cls.__new__(cls) for cls in BUILTIN_LOGITS_PROCESSORS] + [Custom() for _ in custom]
        return SimpleNamespace(all=procs)

    hook = logitsprocs_hook(stock)
    vllm_config = SimpleNamespace(speculative_config=object(), additional_config={"cos": cfg})
    import vllm.config.utils

    monkeypatch.setattr(vllm.config.utils, "replace", lambda obj, **kw: SimpleNamespace(**{**vars(obj), **kw}))
    assert len(hook(vllm_config, "cpu", False, False).all) == len(BUILTIN_LOGITS_PROCESSORS)
    assert seen[-1] is None  # built as without speculative decoding: min_p and logit_bias too
    with pytest.raises(ValueError, match=r"custom logits processors \(Custom\).*schedule 'standard'"):
        hook(vllm_config, "cpu", False, False, ["my.Proc"])


def test_a_reused_engine_config_id_does_not_return_the_old_engine_s_cos_config():
    """``cos_config_of`` caches by id(vllm_config); a new engine's config object can get the id
    of one already collected (seen: a 2-model engine validated requests against the previous
    in-process 4-model engine's config), so the entry must belong to the same object."""
    from types import SimpleNamespace

    from vllm_cos.adapters import request_checks

    old, new = SimpleNamespace(additional_config=None), SimpleNamespace(additional_config=None)
    request_checks._configs[id(new)] = (old, "the collected engine's config")  # as if old's id were new's
    try:
        assert request_checks.cos_config_of(new) is None  # parsed afresh: new carries no CoS config
    finally:
        request_checks._configs.pop(id(new), None)
