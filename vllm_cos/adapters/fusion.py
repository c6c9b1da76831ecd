"""Hook: fused verify-only steps under ``gamma: auto`` (``GPUModelRunner._model_forward``).

When the draft-length controller chooses 0 drafts (a loaded batch, where verifying k tokens
costs more than it brings), the step after it has nothing to verify but the served model's own
proposal.  Scoring that one token per request in a pass of the draft group's own costs a whole
second forward: attention metadata, forward context and launch overheads for a single token.
A **fused** step runs the draft group inside the served model's forward instead, on the same
tokens, under the runner's own forward context (the runner builds attention metadata and slot
mappings for every layer of its KV cache groups, the group's layers included), and the sampler
draws the next token straight from r at each request's last token: what ``standard`` does, at
what ``standard`` costs.

A step is fused when, after the runner's ``_update_states`` and before its forward,

* the previous step's proposer chose 0 drafts under ``gamma: auto`` (:attr:`FusedGroup.wanted`),
* no request has drafts scheduled (nothing is left to verify against the stash), and
* no request wants prompt logprobs (those come from the proposer's first pass).

The proposer of a fused step draws nothing; when the controller wants drafts again it first
runs the group over the sampled tokens (one single-token pass), then drafts.

Hand-off (asserted, :class:`~vllm_cos.adapters.step.StepInvariantError`): a planned step's
forward puts the group's logits (``fused-planned``), its sampler takes them for the same rows
(``fused-same-batch``); a planned step whose forward did not run the group is ``fused-forward``.

A fused step whose controller keeps 0 drafts is closed by the drafter from
``GPUModelRunner.propose_draft_token_ids`` (:func:`propose_hook`): vLLM's drafter preparation
(next-token ids, padded inputs) is skipped, its outputs are only read by async scheduling.

vLLM internals touched: ``GPUModelRunner._model_forward`` (keyword arguments ``input_ids``,
``positions``, ``intermediate_tensors``, ``inputs_embeds``), ``GPUModelRunner.propose_draft_token_ids``,
runner attributes ``drafter``, ``discard_request_mask.gpu``, ``_draft_probs``, ``_draft_prob_req_ids``,
``SchedulerOutput.num_spec_tokens_to_schedule``,
``input_batch.num_reqs``, ``num_prompt_logprobs``,
``query_start_loc.gpu``; ``SchedulerOutput.scheduled_spec_decode_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_cos.adapters.standard_rows import bind_step_rows
from vllm_cos.adapters.step import StepInvariantError


@dataclass
class FusedGroup:
    """Whether this step runs fused, and the group's logits its forward produced."""

    wanted: bool = False  # the previous step's proposer chose 0 drafts under gamma: auto
    planned: bool = False  # this step runs fused (decided before its forward)
    group_logits: torch.Tensor | None = None  # [M, B, V] at each request's last token

    def plan(self, fuse: bool) -> None:
        self.planned, self.group_logits = fuse, None

    def put(self, group_logits: torch.Tensor) -> None:
        if not self.planned:
            raise StepInvariantError("fused-planned", "the group ran inside the served model's forward "
                                     "of a step that was not planned as fused")
        self.planned, self.group_logits = False, group_logits

    def take(self, batch: int) -> torch.Tensor | None:
        """The group's logits [M, B, V] of a fused step (None: the step is not fused)."""
        if self.planned:
            raise StepInvariantError("fused-forward", "the step was planned as fused but its forward "
                                     "did not run the draft group; r would miss the group's logits")
        group_logits, self.group_logits = self.group_logits, None
        if group_logits is not None and group_logits.shape[1] != batch:
            raise StepInvariantError("fused-same-batch", f"the fused forward scored {group_logits.shape[1]} "
                                     f"requests but the sampler samples {batch}")
        return group_logits


def fusable(runner, scheduler_output) -> bool:
    """Whether the step the runner is about to run may be fused (see the module's list)."""
    if any(scheduler_output.scheduled_spec_decode_tokens.values()):
        return False
    return not runner.num_prompt_logprobs


def group_logits_at_last_tokens(runner, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Run the draft group on the step's tokens (runner's forward context); its logits [M, B, V]
    at each request's last token, the rows the runner samples when no drafts are scheduled."""
    group = runner.drafter.model
    hidden = group(input_ids=input_ids, positions=positions)
    if isinstance(hidden, tuple):
        hidden = hidden[0]
    num_reqs = runner.input_batch.num_reqs
    last = runner.query_start_loc.gpu[1: num_reqs + 1].long() - 1  # [B]
    return group.member_logits(hidden[last])


def model_forward_hook(stock, cos_runners):
    """``GPUModelRunner._model_forward``: a planned fused step also runs the draft group; under
    ``standard`` the step's per-request settings are bound first (:mod:`.standard_rows`)."""

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None,
                       **model_kwargs):
        core = cos_runners.get(self)
        if core is None:
            bind_step_rows(self)  # standard: the requests' own rule parameters
        output = stock(self, input_ids=input_ids, positions=positions, intermediate_tensors=intermediate_tensors,
                       inputs_embeds=inputs_embeds, **model_kwargs)
        if core is not None and core.fusion.planned:
            core.fusion.put(group_logits_at_last_tokens(self, input_ids, positions))
            core.stats.add("draft_forwards", 1)
            core.stats.add("fused_steps", 1)
        return output

    return _model_forward


def propose_hook(stock, cos_runners):
    """``GPUModelRunner.propose_draft_token_ids``: after a fused step that drafts nothing next,
    the drafter closes the step itself (no next-token ids or padded inputs are prepared: with
    synchronous scheduling nothing reads them); any other step runs the stock method."""

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                                sample_hidden_states, aux_hidden_states, spec_decode_metadata,
                                common_attn_metadata, slot_mappings):
        if cos_runners.get(self) is not None and torch.is_tensor(sampled_token_ids):
            drafts = self.drafter.cos_close_fused_step(sampled_token_ids, self.discard_request_mask.gpu,
                                                       common_attn_metadata,
                                                       scheduler_output.num_spec_tokens_to_schedule)
            if drafts is not None:
                self._draft_probs = self._draft_prob_req_ids = None
                return drafts
        return stock(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                     sample_hidden_states, aux_hidden_states, spec_decode_metadata, common_attn_metadata,
                     slot_mappings)

    return propose_draft_token_ids
