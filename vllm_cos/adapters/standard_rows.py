"""Hook: per-request collaboration settings under ``standard`` (vllm_cos.overrides).

Under ``standard`` the served model is :class:`~vllm_cos.adapters.member_stack.CoSStandardForCausalLM`
and its ``compute_logits`` returns log r.  Its rows are the step's sampled positions, one per
request in the input batch's order (no speculative decoding runs under ``standard``), so the
rule's per-row parameters are known once the runner has laid out the batch:

1. ``GPUModelRunner._model_forward`` (:func:`bind_step_rows`, called by the fusion hook for
   runners that are not CoS runners) binds the batch's settings to the model for its next
   ``compute_logits`` -- or clears the binding when no request gives any;
2. that ``compute_logits`` takes the binding and checks it has one row per bound request
   (``standard-rows``, a :class:`~vllm_cos.adapters.step.StepInvariantError` otherwise);
3. prompt logprobs bind one request's settings per call (:func:`request_rows`, used by
   :mod:`vllm_cos.adapters.prompt_logprobs`).

A batch without settings costs one scan of the requests' ``extra_args`` per step.

vLLM internals touched: ``GPUModelRunner.get_model``, runner attributes ``requests``
(``CachedRequestState.sampling_params.extra_args``) and ``input_batch.req_ids``.
"""

from __future__ import annotations

import torch

from vllm_cos.overrides import BatchOverrides


def standard_model(runner):
    """The runner's ``CoSStandardForCausalLM`` (None: the runner serves another model)."""
    from vllm_cos.adapters.member_stack import CoSStandardForCausalLM

    model = getattr(runner, "model", None)
    if model is not None and not isinstance(model, CoSStandardForCausalLM):
        model = runner.get_model()  # unwraps a CUDA graph wrapper
    return model if isinstance(model, CoSStandardForCausalLM) else None


def bind_step_rows(runner) -> None:
    """Before a ``standard`` step's ``compute_logits``: its rows' rule parameters."""
    model = standard_model(runner)
    if model is None:
        return
    req_ids = list(runner.input_batch.req_ids)
    model.bind_rows(_row_params(runner, model, req_ids, torch.arange(len(req_ids), device=model.rows_device)),
                    len(req_ids))


def request_rows(runner, model, req_id: str, count: int) -> dict | None:
    """The rule parameters of ``count`` rows of one request (None: it gives no settings)."""
    return _row_params(runner, model, [req_id], torch.zeros(count, dtype=torch.long, device=model.rows_device))


def _row_params(runner, model, req_ids: list, request: torch.Tensor) -> dict | None:
    """The rule parameters of rows of requests ``req_ids[request[n]]`` (None: none gives settings)."""
    overrides = BatchOverrides.of_requests(runner.requests, req_ids, model.cos_config, model.rows_device)
    return None if overrides is None else overrides.rows(request)
