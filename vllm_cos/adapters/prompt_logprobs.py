"""Hook: prompt logprobs of r (``SamplingParams.prompt_logprobs``, the OpenAI ``echo`` /
``prompt_logprobs`` paths) under ``naive`` / ``alternate``.

Stock vLLM scores the prompt with the served model alone (``GPUModelRunner.
_get_prompt_logprobs_dict``).  Under CoS the number a log-likelihood evaluation wants is
log r(prompt[i + 1] | prompt[: i + 1]), r the combination of every collaborator.  In the same
engine step:

1. the proposer's first pass runs the draft group over the step's tokens (for a prefill chunk:
   the prompt tokens, at the served model's positions); for every request that asked for prompt
   logprobs it hands the group's logits at those tokens to :class:`PromptScores`;
2. the runner's bookkeeping then calls :func:`cos_prompt_logprobs` (installed over
   ``_get_prompt_logprobs_dict`` for CoS runners only), which combines T's logits with the
   group's, applies no request controls (as stock: prompt tokens are not sampled) and fills
   vLLM's per-request prompt-logprob tensors chunk by chunk, with the stock bookkeeping
   (``in_progress_prompt_logprobs_cpu``, results returned with the last chunk).

A request whose group scores are missing raises :class:`~vllm_cos.adapters.step.StepInvariantError`.
Under ``standard`` the served model is the combined wrapper, whose logits already are log r: the
stock method serves, unless a prompt-logprob request gives its own collaboration settings
(vllm_cos.overrides); then the same loop scores each request with its settings bound to the
wrapper (:mod:`~vllm_cos.adapters.standard_rows`).

vLLM internals touched: ``GPUModelRunner._get_prompt_logprobs_dict`` (replaced for CoS
runners), ``num_prompt_logprobs``, ``requests[...].prompt_token_ids`` /
``num_computed_tokens`` / ``in_progress_prompt_logprobs_cpu``, ``input_batch.req_id_to_index``,
``query_start_loc.np``, ``model.compute_logits``, ``LogprobsTensors.empty_cpu``,
``Sampler.gather_logprobs``, ``model_config.logprobs_mode``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_cos.adapters.standard_rows import request_rows, standard_model
from vllm_cos.adapters.step import StepInvariantError
from vllm_cos.overrides import BatchOverrides


@dataclass
class PromptScores:
    """The draft group's logits [M, n, V] at one step's tokens, per prompt-logprob request."""

    pending: dict = field(default_factory=dict)

    def put(self, req_id: str, group_logits: torch.Tensor) -> None:
        self.pending[req_id] = group_logits

    def take(self, req_id: str) -> torch.Tensor:
        if req_id not in self.pending:
            raise StepInvariantError("prompt-scores", f"request {req_id} wants prompt logprobs but the "
                                     f"draft group's first pass left no scores for it this step")
        return self.pending.pop(req_id)

    def clear(self) -> None:
        """A new step: the previous one's scores must all have been taken."""
        if self.pending:
            raise StepInvariantError("prompt-scores-consumed", f"prompt scores of {sorted(self.pending)} "
                                     f"were never turned into prompt logprobs")


def stash_group_scores(core, runner, target_cad, first_pass_cad, hidden, member_logits) -> None:
    """Step 1: the group's logits at each prompt-logprob request's tokens of this step."""
    core.prompt_scores.clear()
    wanted = getattr(runner, "num_prompt_logprobs", None)
    if not wanted:
        return
    index = runner.input_batch.req_id_to_index
    target_starts = target_cad.query_start_loc_cpu.tolist()
    group_starts = first_pass_cad.query_start_loc_cpu.tolist()
    for req_id in wanted:
        row = index.get(req_id)
        if row is None or row + 1 >= len(target_starts):
            continue
        count = target_starts[row + 1] - target_starts[row]
        rows = hidden[group_starts[row]: group_starts[row] + count]
        core.prompt_scores.put(req_id, core.crop(member_logits(rows)))


def _scores(core, runner, hidden_states, req_id: str, start: int, count: int) -> torch.Tensor:
    """log r (or r's logits, per logprobs_mode) [count, V] at prompt positions start.. of a request."""
    group = core.prompt_scores.take(req_id)[:, :count]
    offset = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
    target = core.crop(runner.model.compute_logits(hidden_states[offset: offset + count]))
    overrides = core.request_overrides(runner, [req_id], target.device)
    log_r = core.combine(target, group, None if overrides is None else
                         overrides.rows(torch.zeros(count, dtype=torch.long, device=target.device)))
    if runner.model_config.logprobs_mode in ("raw_logits", "processed_logits"):
        return log_r
    return torch.log_softmax(log_r, dim=-1)


def _standard_scores(runner, model, hidden_states, req_id: str, start: int, count: int) -> torch.Tensor:
    """As :func:`_scores` under ``standard``: the wrapper's log r with the request's settings bound."""
    offset = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
    model.bind_rows(request_rows(runner, model, req_id, count), count)
    logits = model.compute_logits(hidden_states[offset: offset + count]).float()
    if runner.model_config.logprobs_mode in ("raw_logits", "processed_logits"):
        return logits
    return torch.log_softmax(logits, dim=-1)


def cos_prompt_logprobs(runner, core, hidden_states, num_scheduled_tokens: dict) -> dict:
    """Step 2: ``_get_prompt_logprobs_dict`` with r in place of the served model's p."""
    return prompt_logprobs_of(runner, num_scheduled_tokens,
                              lambda req_id, start, count: _scores(core, runner, hidden_states, req_id, start, count),
                              lambda req_id: core.prompt_scores.pending.pop(req_id, None))


def standard_prompt_logprobs(runner, model, hidden_states, num_scheduled_tokens: dict) -> dict:
    """``_get_prompt_logprobs_dict`` under ``standard`` with each request's own settings."""
    return prompt_logprobs_of(runner, num_scheduled_tokens,
                              lambda req_id, start, count: _standard_scores(runner, model, hidden_states, req_id,
                                                                            start, count),
                              lambda req_id: None)


def _any_settings(runner, model) -> bool:
    wanted = getattr(runner, "num_prompt_logprobs", None) or {}
    return BatchOverrides.of_requests(runner.requests, list(wanted), model.cos_config, "cpu") is not None


def prompt_logprobs_of(runner, num_scheduled_tokens: dict, scores, skip) -> dict:
    """The stock bookkeeping of prompt logprobs around ``scores(req_id, start, count)`` [count, V]
    (log-probabilities, or logits per ``logprobs_mode``); ``skip(req_id)``: a chunk with nothing to score."""
    from vllm.v1.outputs import LogprobsTensors
    from vllm.v1.sample.sampler import Sampler

    wanted = runner.num_prompt_logprobs
    if not wanted:
        return {}
    finished, done = {}, []
    for req_id, num_logprobs in wanted.items():
        scheduled = num_scheduled_tokens.get(req_id)
        request = runner.requests[req_id]
        if scheduled is None or request.prompt_token_ids is None:
            continue  # preempted in prefill, or prompt embeddings (stock skips both)
        prompt = request.prompt_token_ids
        target = request.in_progress_prompt_logprobs_cpu
        if target is None:
            target = LogprobsTensors.empty_cpu(len(prompt) - 1, num_logprobs + 1)
            request.in_progress_prompt_logprobs_cpu = target
        start = request.num_computed_tokens
        remaining = len(prompt) - start - 1  # prompt positions still without a score
        count = scheduled if scheduled <= remaining else remaining
        if scheduled > remaining:  # the last chunk: the request's prompt logprobs are complete
            finished[req_id] = target
            done.append(req_id)
        if count <= 0:
            skip(req_id)
            continue
        chunk = scores(req_id, start, count)
        next_ids = torch.tensor(prompt[start + 1: start + 1 + count], device=chunk.device)
        ids, logprobs, ranks = Sampler.gather_logprobs(chunk, num_logprobs, next_ids)[:3]
        part = slice(start, start + count)
        target.logprob_token_ids[part].copy_(ids)
        target.logprobs[part].copy_(logprobs)
        target.selected_token_ranks[part].copy_(ranks)
    for req_id in done:
        del wanted[req_id]
        runner.requests[req_id].in_progress_prompt_logprobs_cpu = None
    return finished


def prompt_logprobs_hook(stock, runners):
    """``GPUModelRunner._get_prompt_logprobs_dict``: ours for CoS runners and for ``standard`` requests
    with their own settings, stock otherwise."""
    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        core = runners.get(self)
        if core is not None:
            return cos_prompt_logprobs(self, core, hidden_states, num_scheduled_tokens)
        model = standard_model(self)
        if model is not None and _any_settings(self, model):
            return standard_prompt_logprobs(self, model, hidden_states, num_scheduled_tokens)
        return stock(self, hidden_states, num_scheduled_tokens)
    return _get_prompt_logprobs_dict
