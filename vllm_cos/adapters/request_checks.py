"""Hook: which request parameters a CoS speculative engine accepts.

vLLM refuses ``min_p`` and ``logit_bias`` with any speculative decoding because its rejection
sampler cannot apply them at draft positions.  CoS applies them to r itself
(:mod:`vllm_cos.adapters.controls`), so for an engine whose ``additional_config`` carries a
CoS configuration the refusal is lifted.  What CoS cannot apply at draft positions is refused
per request instead, with vLLM's validation error (HTTP 400 naming the parameter):
``thinking_token_budget``.

A request's own collaboration settings (``extra_args`` / ``vllm_xargs`` keys ``cos_weights``,
``cos_mu``, ``cos_speculate``; :mod:`vllm_cos.overrides`) are validated here against the
engine's CoS configuration, on every CoS engine (``standard`` included): an invalid one is
HTTP 400 naming the key.

vLLM internals touched: ``InputProcessor._validate_params`` (``self.vllm_config``),
``SamplingParams._validate_spec_decode``, ``SamplingParams.extra_args``, ``VLLMValidationError``.
"""

from __future__ import annotations

import contextvars

from vllm_cos.engine import ADDITIONAL_CONFIG_KEY, config_from_additional
from vllm_cos.overrides import OverrideError, parse_request

_cos_engine = contextvars.ContextVar("cos_engine", default=False)
_installed = False


def is_cos_speculative(vllm_config) -> bool:
    additional = getattr(vllm_config, "additional_config", None) or {}
    return getattr(vllm_config, "speculative_config", None) is not None and ADDITIONAL_CONFIG_KEY in additional


_configs: dict[int, tuple] = {}  # id(vllm_config) -> (that vllm_config, its CoSConfig), parsed once


def cos_config_of(vllm_config):
    """The CoS configuration an engine runs (None: not a CoS engine)."""
    key = id(vllm_config)
    entry = _configs.get(key)
    if entry is None or entry[0] is not vllm_config:  # an id is reused once its engine is gone
        carried = config_from_additional(getattr(vllm_config, "additional_config", None))
        entry = _configs[key] = (vllm_config, None if carried is None else carried[0])
    return entry[1]


def check_overrides(params, cfg) -> None:
    """A request's CoS settings, validated against ``cfg`` (raises VLLMValidationError)."""
    from vllm.exceptions import VLLMValidationError

    extra = getattr(params, "extra_args", None)
    try:
        parse_request(extra, cfg)
    except OverrideError as exc:
        raise VLLMValidationError(f"vllm_xargs / extra_args: {exc}", parameter=exc.field, value=exc.value) from None


def check_for_cos(params) -> None:
    """Per-request refusals of a CoS speculative engine (raises VLLMValidationError)."""
    from vllm.exceptions import VLLMValidationError

    if getattr(params, "thinking_token_budget", None) is not None:
        raise VLLMValidationError(
            "thinking_token_budget is not supported with CoS schedules 'naive' / 'alternate' "
            "(it cannot be evaluated at draft positions); use schedule 'standard'",
            parameter="thinking_token_budget", value=params.thinking_token_budget)


def install() -> None:
    global _installed
    if _installed:
        return
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    stock_validate_params = InputProcessor._validate_params
    stock_validate_spec = SamplingParams._validate_spec_decode

    def _validate_params(self, params, *args, **kwargs):
        cfg = cos_config_of(self.vllm_config)
        if cfg is not None:
            check_overrides(params, cfg)
        token = _cos_engine.set(is_cos_speculative(self.vllm_config))
        try:
            return stock_validate_params(self, params, *args, **kwargs)
        finally:
            _cos_engine.reset(token)

    def _validate_spec_decode(self, speculative_config):
        if _cos_engine.get():
            return check_for_cos(self)
        return stock_validate_spec(self, speculative_config)

    InputProcessor._validate_params = _validate_params
    SamplingParams._validate_spec_decode = _validate_spec_decode
    _installed = True
