"""Hook: the runner's samplers under ``naive`` / ``alternate`` (``runner.sampler`` and
``runner.rejection_sampler``).

Terms, per request (row), T = the served model, G = the draft group:

* **accepted** draft: G's draft x_j survives with probability min(1, r_j(x_j) / q_j(x_j)),
  r_j the controlled, tempered combination of T's and G's logits at position j
  (:class:`~vllm_cos.adapters.controls.Controls`, then
  :class:`~vllm_cos.adapters.controls.RowSampling`), q_j the drafter's distribution;
* **recovered** token: at the first rejection, a draw from norm(max(0, r_j - q_j)); the row
  then ends;
* **pending** drafts: drafts after the first one that some member scored lazily
  (:mod:`vllm_cos.lazy`) are not checked here; where every checked draft was accepted they are
  written as drafted and verified by the proposer after its first pass, before T's proposal;
* **served proposal**: when every usable draft is accepted, T proposes the next token from
  its own controlled distribution.  It is written in the next column of the sampled-token
  tensor but is *not* an output yet: the proposer verifies it against r in the same step
  (:class:`~vllm_cos.adapters.step.CoSStep`).  vLLM's bonus token has no counterpart here.

Both samplers open the step's :class:`~vllm_cos.adapters.step.CoSStep`; the math is
:func:`vllm_cos.verify.verify`.  A *fused* step (:mod:`vllm_cos.adapters.fusion`: no drafts,
the group ran inside the served model's forward) draws each request's token straight from r.

vLLM internals touched: ``SpecDecodeMetadata`` (``num_draft_tokens``, ``max_spec_len``,
``draft_token_ids``, ``target_logits_indices``, ``bonus_logits_indices``), ``SamplerOutput``,
``runner.input_batch.req_ids``; the stock samplers stay reachable for their helpers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_cos.adapters.chain import seeded_races
from vllm_cos.adapters.controls import Controls, RowLayout, RowSampling
from vllm_cos.adapters.step import PendingDrafts, ServedProposals, StepInvariantError
from vllm_cos.verify import verify


@dataclass
class LogprobRows:
    """The sampler output's logprobs tensors; row ``i * width + slot`` belongs to (i, slot)."""

    tensors: object  # vllm LogprobsTensors
    width: int
    num_logprobs: int


def _sampler_output(token_ids: torch.Tensor, logprobs: LogprobRows | None):
    from vllm.v1.outputs import SamplerOutput

    return SamplerOutput(sampled_token_ids=token_ids.to(torch.int32),
                         logprobs_tensors=None if logprobs is None else logprobs.tensors)


class _CoSSamplerBase:
    def __init__(self, stock, core, runner):
        self._stock, self._core, self._runner = stock, core, runner

    def __getattr__(self, name):  # logprobs helpers, logprobs_mode, ... stay stock
        return getattr(self._stock, name)

    def _batch_state(self, sampling_metadata, batch: int, device):
        req_ids = tuple(self._runner.input_batch.req_ids[:batch])  # fewer in profiling runs
        overrides = self._core.request_overrides(self._runner, req_ids + (None,) * (batch - len(req_ids)), device)
        controls = Controls(sampling_metadata, batch, self._core.tokenizer_size, device, overrides)
        emitted = None
        if sampling_metadata.generators:  # seeded rows race at their output positions
            requests = self._runner.requests
            emitted = [len(requests[r].output_token_ids) if r in requests else 0 for r in req_ids]
            emitted += [0] * (batch - len(emitted))
        return req_ids, controls, RowSampling(sampling_metadata, batch, device, controls.min_p, emitted)

    def _sample_fused(self, logits, group_logits, grammar, sampling_metadata):
        """A fused step (:mod:`vllm_cos.adapters.fusion`): the next token straight from r, built
        from T's logits [B, V] and the group's [M, B, V] at each request's last token."""
        core = self._core
        batch, device = logits.shape[0], logits.device
        req_ids, controls, sampling = self._batch_state(sampling_metadata, batch, device)
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        log_r = core.combine(core.crop(logits), group_logits, controls.rule_params(RowLayout.at(zeros)))
        grammar = None if grammar is None else core.crop(grammar)
        r = sampling.probs(controls.apply(log_r, RowLayout.at(zeros), grammar))
        nothing = ServedProposals(rows=torch.zeros(batch, dtype=torch.bool, device=device), slot=zeros,
                                  target_logits=log_r, proposal_probs=r, grammar=grammar)
        return self._one_token_step(sampling.sample(r, zeros), nothing, req_ids, controls, sampling,
                                    sampling_metadata, fused=True)

    def _one_token_step(self, token, proposals, req_ids, controls, sampling, sampling_metadata, fused=False):
        """Open the step of a one-token-per-row sample (``token`` [B]) and return its output; the
        logprobs are those of the distribution it was drawn from (``proposals``' logits and probs:
        r when fused, T's otherwise, refilled with r by the proposer)."""
        core, batch = self._core, token.shape[0]
        rows = None
        if sampling_metadata.max_num_logprobs is not None:
            k = sampling_metadata.max_num_logprobs
            rows = LogprobRows(core.logprob_rows(proposals.target_logits, proposals.proposal_probs, token, k), 1, k)
        core.steps.open(req_ids, proposals, controls, sampling, rows, fused=fused)
        for name in ("tokens_emitted", "row_steps"):
            core.stats.add(name, batch)
        core.stats.add("steps", 1)
        return _sampler_output(token.unsqueeze(1), rows)

    def _propose(self, target_logits, position, grammar, controls, sampling):
        """T's proposal at window ``position`` [B]: (token [B], proposal probs [B, V])."""
        proposal = sampling.probs(controls.apply(target_logits, RowLayout.at(position), grammar))
        return sampling.sample(proposal, position), proposal


class CoSPlainSampler(_CoSSamplerBase):
    """``runner.sampler`` for steps without drafts (prefill): T proposes; the group verifies."""

    def __call__(self, logits: torch.Tensor, sampling_metadata, **kwargs):
        core = self._core
        grammar = core.grammar.take(logits)
        fused = core.fusion.take(logits.shape[0])
        if fused is not None:
            return self._sample_fused(logits, fused, grammar, sampling_metadata)
        batch, device = logits.shape[0], logits.device
        req_ids, controls, sampling = self._batch_state(sampling_metadata, batch, device)
        target = core.crop(logits)
        grammar = None if grammar is None else core.crop(grammar)
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        token, proposal = self._propose(target, zeros, grammar, controls, sampling)
        proposals = ServedProposals(rows=torch.ones(batch, dtype=torch.bool, device=device), slot=zeros,
                                    target_logits=target, proposal_probs=proposal, grammar=grammar)
        return self._one_token_step(token, proposals, req_ids, controls, sampling, sampling_metadata)


def draft_grid(metadata, device):
    """Where each (row, position) of a verify window is in vLLM's flat layout.

    Returns (row_index [B, K+1] into the logits, scheduled drafts [B, K] (-1 past a row's
    drafts), counts [B]).
    """
    num_drafts = list(metadata.num_draft_tokens)
    k = metadata.max_spec_len
    counts = torch.tensor(num_drafts, dtype=torch.long, device=device)  # [B]
    position = torch.arange(k + 1, device=device)  # [K+1]
    is_draft = position < counts.unsqueeze(1)  # [B, K+1]
    total = sum(num_drafts)
    flat = ((counts.cumsum(0) - counts).unsqueeze(1) + position).clamp(max=max(total - 1, 0))
    target_idx = metadata.target_logits_indices.to(device).long()
    scheduled = metadata.draft_token_ids.to(device).long()
    if total == 0:
        target_idx = scheduled = torch.zeros(1, dtype=torch.long, device=device)
    row_index = torch.where(is_draft, target_idx[flat], metadata.bonus_logits_indices.to(device).long().unsqueeze(1))
    return row_index, torch.where(is_draft, scheduled[flat], -1)[:, :k], counts


def _count_step(stats, batch: int, usable, accepted, rejected, token_ids) -> None:
    for name, value in (("steps", 1), ("row_steps", batch), ("drafts_proposed", usable.sum()),
                        ("drafts_accepted", accepted.sum()), ("draft_rejections", rejected.sum()),
                        ("tokens_emitted", (token_ids >= 0).sum())):
        stats.add(name, value)


def _stashed_drafts(core, req_ids, batch: int, k: int, scheduled, controls, device):
    """The group's stash for this step: (usable [B] = leading drafts vLLM kept as the group
    proposed them, checked [B] = those of them every member scored (the rest wait for the
    proposer: vllm_cos.lazy), member logits [B, K, M, V])."""
    stashed, member_logits, complete = core.stash.take(req_ids + (None,) * (batch - len(req_ids)), k)
    stashed, member_logits, complete = stashed.to(device), member_logits.to(device), complete.to(device)
    usable = (stashed == scheduled).long().cumprod(dim=1).sum(dim=1)  # [B]
    if controls.overrides is not None and controls.overrides.no_speculation is not None:
        usable = torch.where(controls.overrides.no_speculation, 0, usable)  # cos_speculate: 0
    return usable, torch.minimum(usable, complete), member_logits


def _pending_drafts(core, k: int, token_ids, scheduled, accepted, usable, rejected, target_rows, grammar_rows, q):
    """The drafts after the checked ones, where every checked draft was accepted: written into
    ``token_ids`` [B, K+1] as they are and returned as :class:`PendingDrafts` for the proposer to
    verify after its first pass (None when the step has none: every member scored every draft)."""
    width = k - core.complete_drafts(k)  # the most a row can have (a stash of more drafts checks more)
    if width <= 0:
        return None
    batch, device = token_ids.shape[0], token_ids.device
    count = torch.where(rejected, 0, (usable - accepted).clamp(min=0, max=width))  # [B]
    column = torch.arange(k + 1, device=device)
    tentative = (column >= accepted.unsqueeze(1)) & (column < (accepted + count).unsqueeze(1))  # [B, K+1]
    token_ids[:, :k] = torch.where(tentative[:, :k], scheduled, token_ids[:, :k])
    cols = (accepted.unsqueeze(1) + torch.arange(width, device=device)).clamp(max=k - 1)  # [B, P]
    rows = torch.arange(batch, device=device).unsqueeze(1)
    grammar = None if grammar_rows is None else grammar_rows[rows, cols]
    return PendingDrafts(count=count, target_logits=target_rows[rows, cols], proposal_probs=q[rows, cols],
                         grammar=grammar)


class CoSRejectionSampler(_CoSSamplerBase):
    """``runner.rejection_sampler``: the group's drafts against r, then T's proposal."""

    def __call__(self, metadata, draft_probs, logits: torch.Tensor, sampling_metadata):
        core = self._core
        grammar = core.grammar.take(logits)
        device, vocab = logits.device, core.tokenizer_size
        batch, k = len(metadata.num_draft_tokens), metadata.max_spec_len
        fused = core.fusion.take(batch)
        if fused is not None:
            if k or logits.shape[0] != batch:
                raise StepInvariantError("fused-no-drafts", f"a fused step has {sum(metadata.num_draft_tokens)} "
                                         f"scheduled drafts; only verify-only steps are fused")
            return self._sample_fused(logits, fused, grammar, sampling_metadata)
        req_ids, controls, sampling = self._batch_state(sampling_metadata, batch, device)
        row_index, scheduled, counts = draft_grid(metadata, device)
        target_rows = core.crop(logits[row_index.view(-1)]).view(batch, k + 1, vocab)
        grammar_rows = None if grammar is None else core.crop(grammar[row_index.view(-1)]).view(batch, k + 1, vocab)

        usable, checked, member_logits = _stashed_drafts(core, req_ids, batch, k, scheduled, controls, device)
        rows = torch.arange(batch, device=device)
        q = log_r = r = None
        if k > 0:
            layout = RowLayout.grid(batch, k, device)
            log_r = core.combine(target_rows[:, :k].reshape(-1, vocab),
                                 member_logits.float().reshape(batch * k, -1, vocab).transpose(0, 1),
                                 controls.rule_params(layout))
            grammar_k = None if grammar_rows is None else grammar_rows[:, :k].reshape(-1, vocab)
            r = sampling.probs(controls.apply(log_r, layout, grammar_k), layout).view(batch, k, vocab)
            drafts = torch.where(torch.arange(k, device=device) < usable.unsqueeze(1), scheduled, 0)
            q = core.draft_proposals(member_logits, sampling)
            out = verify(drafts, checked, q, torch.cat([r, r.new_zeros(batch, 1, vocab)], dim=1),
                         torch.zeros(batch, dtype=torch.bool, device=device))
            token_ids, accepted, rejected = out.token_ids, out.num_accepted, out.rejected
            if sampling.seeded is not None:  # seeded rows: position-keyed races (vllm_cos.coupling)
                token_ids, accepted, rejected = seeded_races(sampling, layout, drafts, checked, r, token_ids,
                                                             accepted, rejected)
        else:
            token_ids = torch.full((batch, 1), -1, dtype=torch.long, device=device)
            accepted = torch.zeros(batch, dtype=torch.long, device=device)
            rejected = torch.zeros(batch, dtype=torch.bool, device=device)
        pending = _pending_drafts(core, k, token_ids, scheduled, accepted, usable, rejected, target_rows,
                                  grammar_rows, q)

        # T's proposal where every usable draft was accepted (after the pending ones, if any).
        slot = accepted if pending is None else accepted + pending.count
        proposal_logits = target_rows[rows, slot]  # [B, V]
        proposal_grammar = None if grammar_rows is None else grammar_rows[rows, slot]
        token, proposal = self._propose(proposal_logits, slot, proposal_grammar, controls, sampling)
        token_ids[rows, slot] = torch.where(rejected, token_ids[rows, slot], token)
        logprobs = self._logprobs(sampling_metadata, token_ids, log_r, r, proposal_logits, proposal)
        proposals = ServedProposals(rows=~rejected, slot=slot, target_logits=proposal_logits,
                                    proposal_probs=proposal, grammar=proposal_grammar, pending=pending)
        core.steps.open(req_ids, proposals, controls, sampling, logprobs)
        _count_step(core.stats, batch, checked, accepted, rejected, token_ids)
        return _sampler_output(token_ids, logprobs)

    def _logprobs(self, sampling_metadata, token_ids, log_r, r, proposal_logits, proposal):
        """r's logprobs at draft positions; T's at the proposal slot until the proposer has r."""
        if sampling_metadata.max_num_logprobs is None:
            return None
        batch, width = token_ids.shape
        vocab = proposal.shape[-1]
        k = sampling_metadata.max_num_logprobs
        all_log_r = proposal_logits.unsqueeze(1).repeat(1, width, 1)
        all_r = proposal.unsqueeze(1).repeat(1, width, 1)
        if width > 1:
            all_log_r[:, : width - 1] = log_r.view(batch, width - 1, vocab)
            all_r[:, : width - 1] = r
        tensors = self._core.logprob_rows(all_log_r.view(-1, vocab), all_r.view(-1, vocab), token_ids.view(-1), k)
        return LogprobRows(tensors, width, k)
