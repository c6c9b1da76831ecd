"""Hook: naive / alternate CoS on vLLM's ``draft_model`` speculative decoding (V1 runner).

Supported runner: :data:`vllm_cos.engine.SUPPORTED_RUNNER` (checked at model load).
What one engine step does is told in :mod:`vllm_cos.adapters.step`; the pieces:

* :mod:`~vllm_cos.adapters.proposer` -- ``CoSProposer`` replaces the runner's
  ``DraftModelProposer`` and installs the samplers (:mod:`~vllm_cos.adapters.samplers`);
* :mod:`~vllm_cos.adapters.controls` -- every request control applied to r;
* :mod:`~vllm_cos.adapters.stash` -- the draft group's logits between two steps.

This module installs the module-level hooks those need, each narrow and a no-op for runners
that do not run CoS:

* ``gpu_model_runner.DraftModelProposer`` -> ``CoSProposer`` (a subclass);
* ``gpu_model_runner.apply_grammar_bitmask``: for a CoS runner the structured-output mask
  goes to the step (r is masked, not the served model's logits); stock otherwise;
* ``gpu_model_runner.build_logitsprocs``: a CoS runner gets vLLM's builtin processors
  (min_tokens, logit_bias, min_p: CoS applies them to r) instead of min_tokens alone; custom
  processors are refused with one line;
* ``GPUModelRunner._update_states``: finished, aborted and preempted requests give their
  draft-stash slot back at once; then the step is planned fused or not
  (:mod:`~vllm_cos.adapters.fusion`);
* ``GPUModelRunner._model_forward``: a fused step runs the draft group in the served model's
  forward context too.
* ``GPUModelRunner._get_prompt_logprobs_dict``: prompt logprobs of r for CoS runners
  (:mod:`~vllm_cos.adapters.prompt_logprobs`).
"""

from __future__ import annotations

import logging

import torch

from vllm_cos.adapters.fusion import fusable, model_forward_hook, propose_hook
from vllm_cos.adapters.prompt_logprobs import prompt_logprobs_hook
from vllm_cos.adapters.proposer import COS_RUNNERS, core_for_batch, make_proposer_class
from vllm_cos.engine import config_from_additional

logger = logging.getLogger("vllm.cos")  # under vLLM's configured "vllm" logger

_installed = False


def grammar_hook(stock):
    def apply_grammar_bitmask(scheduler_output, grammar_output, input_batch, logits):
        core = core_for_batch(input_batch)
        if core is None:
            return stock(scheduler_output, grammar_output, input_batch, logits)
        mask = torch.zeros_like(logits, dtype=torch.float32)
        stock(scheduler_output, grammar_output, input_batch, mask)  # 0 allowed, -inf not
        core.grammar.put(logits, mask)
    return apply_grammar_bitmask


def logitsprocs_hook(stock):
    def build_logitsprocs(vllm_config, device, is_pin_memory, is_pooling_model, custom_logitsprocs=()):
        carried = None if vllm_config.speculative_config is None else config_from_additional(
            vllm_config.additional_config)
        if carried is None:
            return stock(vllm_config, device, is_pin_memory, is_pooling_model, custom_logitsprocs)
        from vllm.config.utils import replace
        from vllm.v1.sample.logits_processor import BUILTIN_LOGITS_PROCESSORS

        procs = stock(replace(vllm_config, speculative_config=None), device, is_pin_memory,
                      is_pooling_model, custom_logitsprocs)
        others = [type(p).__name__ for p in procs.all if type(p) not in BUILTIN_LOGITS_PROCESSORS]
        if others:
            raise ValueError(f"cos: custom logits processors ({', '.join(others)}) cannot be applied to r "
                             f"at draft positions under schedule '{carried[0].schedule}'; use schedule "
                             f"'standard' or drop --logits-processors")
        return procs
    return build_logitsprocs


def update_states_hook(stock):
    def _update_states(self, scheduler_output):
        core = COS_RUNNERS.get(self)
        if core is not None and core.stash is not None:
            core.stash.free(scheduler_output.finished_req_ids)
            core.stash.free(getattr(scheduler_output, "preempted_req_ids", None) or ())
        out = stock(self, scheduler_output)
        if core is not None:
            core.fusion.plan(core.fusion.wanted and fusable(self, scheduler_output))
        return out
    return _update_states


def install() -> None:
    global _installed
    if _installed:
        return
    import vllm.v1.worker.gpu_model_runner as runner_module

    runner_module.DraftModelProposer = make_proposer_class(runner_module.DraftModelProposer)
    runner_module.apply_grammar_bitmask = grammar_hook(runner_module.apply_grammar_bitmask)
    runner_module.build_logitsprocs = logitsprocs_hook(runner_module.build_logitsprocs)
    runner_class = runner_module.GPUModelRunner
    runner_class._update_states = update_states_hook(runner_class._update_states)
    runner_class._model_forward = model_forward_hook(runner_class._model_forward, COS_RUNNERS)
    runner_class.propose_draft_token_ids = propose_hook(runner_class.propose_draft_token_ids, COS_RUNNERS)
    runner_class._get_prompt_logprobs_dict = prompt_logprobs_hook(runner_class._get_prompt_logprobs_dict,
                                                                  COS_RUNNERS)
    _installed = True


def worker_stats(worker) -> dict | None:
    """CoS counters of one worker (for ``collective_rpc``); None outside CoS schedules and on
    tensor-parallel ranks other than 0 (they count the same tokens as rank 0)."""
    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    core = getattr(drafter, "cos_core", None)
    if core is None or not core.reporting:
        return None
    stats = core.stats.as_dict()
    stats["stash_requests"] = 0 if core.stash is None else len(core.stash)
    return stats
