"""Per-request collaboration settings: a request overrides the rule's parameters for itself.

Keys of ``SamplingParams.extra_args`` (the OpenAI server's ``vllm_xargs`` lands there):

* ``cos_weights`` (weighted_ensemble): one weight per model in the cos.yaml's ``models`` order,
  e.g. ``[0.7, 0.3]``, or a mapping model name -> weight; non-negative, summing to 1;
* ``cos_mu`` (contrastive): the amateur's weight mu >= 0;
* ``cos_speculate``: 1 (default) or 0 -- 0 verifies only the served model's own token each
  step (the group's drafts for the request are never verified).

:func:`parse_request` validates one request's keys against the configuration (a
:class:`OverrideError` names the field); :class:`BatchOverrides` holds a batch's settings as
tensors, one row per request, with the configuration's values where a request gives none.
Other ``extra_args`` keys are not ours and are left alone.  Nothing here imports vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

KEYS = ("cos_weights", "cos_mu", "cos_speculate")
SUM_TOLERANCE = 1e-6


class OverrideError(ValueError):
    """A request's CoS setting is invalid; ``field`` names it (e.g. ``cos_weights``)."""

    def __init__(self, field: str, problem: str, value: Any = None):
        super().__init__(f"{field}: {problem}")
        self.field, self.value = field, value


@dataclass(frozen=True)
class RequestOverride:
    weights: tuple[float, ...] | None = None  # in the models' order
    mu: float | None = None
    speculate: bool = True


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OverrideError(field, f"must be a finite number, got {value!r}", value)
    return float(value)


def _weights(value: Any, cfg) -> tuple[float, ...]:
    names = list(cfg.model_names)
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in names]
        if unknown:
            raise OverrideError("cos_weights", f"{unknown[0]!r} is not one of the models ({', '.join(names)})", value)
        missing = [n for n in names if n not in value]
        if missing:
            raise OverrideError("cos_weights", f"no weight for model {missing[0]!r} (give one per model: "
                                f"{', '.join(names)})", value)
        value = [value[n] for n in names]
    if not isinstance(value, (list, tuple)) or len(value) != len(names):
        raise OverrideError("cos_weights", f"must be a list of {len(names)} numbers (models {', '.join(names)}) "
                            f"or a mapping model -> weight, got {value!r}", value)
    weights = tuple(_number(w, f"cos_weights[{i}]") for i, w in enumerate(value))
    if any(w < 0 for w in weights):
        raise OverrideError("cos_weights", f"weights must be >= 0, got {list(weights)}", value)
    if abs(sum(weights) - 1.0) > SUM_TOLERANCE:
        raise OverrideError("cos_weights", f"weights must sum to 1, got {sum(weights):g}", value)
    return weights


def parse_request(extra_args: Mapping[str, Any] | None, cfg) -> RequestOverride | None:
    """One request's settings (None: it gives none).  Raises :class:`OverrideError`."""
    if not extra_args:
        return None
    ours = {k: v for k, v in extra_args.items() if isinstance(k, str) and k.startswith("cos_")}
    if not ours:
        return None
    unknown = [k for k in ours if k not in KEYS]
    if unknown:
        raise OverrideError(unknown[0], f"unknown CoS setting (known: {', '.join(KEYS)})", ours[unknown[0]])
    rule = cfg.rule.name
    weights = mu = None
    if "cos_weights" in ours:
        if rule != "weighted_ensemble":
            raise OverrideError("cos_weights", f"only for rule weighted_ensemble; this server's rule is {rule}")
        weights = _weights(ours["cos_weights"], cfg)
    if "cos_mu" in ours:
        if rule != "contrastive":
            raise OverrideError("cos_mu", f"only for rule contrastive; this server's rule is {rule}")
        mu = _number(ours["cos_mu"], "cos_mu")
        if mu < 0:
            raise OverrideError("cos_mu", f"must be >= 0, got {mu:g}", mu)
    speculate = ours.get("cos_speculate", 1)
    if isinstance(speculate, bool) or speculate not in (0, 1):
        raise OverrideError("cos_speculate", f"must be 1 or 0, got {speculate!r}", speculate)
    return RequestOverride(weights=weights, mu=mu, speculate=bool(speculate))


@dataclass
class BatchOverrides:
    """A batch's settings, one row per request: ``weights`` [B, M] (models' order), ``mu`` [B],
    ``no_speculation`` [B] bool; a field is None when no request of the batch sets it."""

    weights: torch.Tensor | None
    mu: torch.Tensor | None
    no_speculation: torch.Tensor | None

    @classmethod
    def build(cls, per_request: list[RequestOverride | None], cfg, device) -> "BatchOverrides | None":
        if all(o is None for o in per_request):
            return None
        rule = cfg.rule
        weights = mu = None
        if any(o is not None and o.weights is not None for o in per_request):
            default = [rule.weights[n] for n in cfg.model_names]
            weights = torch.tensor([list(o.weights) if o is not None and o.weights is not None else default
                                    for o in per_request], dtype=torch.float32, device=device)
        if any(o is not None and o.mu is not None for o in per_request):
            mu = torch.tensor([o.mu if o is not None and o.mu is not None else rule.mu for o in per_request],
                              dtype=torch.float32, device=device)
        off = [o is not None and not o.speculate for o in per_request]
        no_speculation = torch.tensor(off, device=device) if any(off) else None
        return cls(weights, mu, no_speculation)

    @classmethod
    def of_requests(cls, requests, req_ids, cfg, device) -> "BatchOverrides | None":
        """The settings of the requests ``req_ids`` (a runner's ``requests``: req_id -> state with
        ``sampling_params.extra_args``; an id not in ``requests`` gives none)."""
        extra = [getattr(getattr(requests[r], "sampling_params", None), "extra_args", None) if r in requests
                 else None for r in req_ids]
        if not any(extra):
            return None
        return cls.build([parse_request(e, cfg) for e in extra], cfg, device)

    def rows(self, request: torch.Tensor) -> dict[str, torch.Tensor]:
        """The combination rule's per-row parameters for rows of requests ``request`` [N]."""
        out = {}
        if self.weights is not None:
            out["weights"] = self.weights[request].T  # [M, N]
        if self.mu is not None:
            out["mu"] = self.mu[request]  # [N]
        return out
