"""Hook: ``CoSProposer``, the runner's ``DraftModelProposer`` under ``naive`` / ``alternate``.

It runs in the same engine step as the samplers (:mod:`vllm_cos.adapters.samplers`), before the
runner's bookkeeping.  Per step:

1. consume the step's :class:`~vllm_cos.adapters.step.CoSStep` (the sampled-token tensor was
   attached by ``prepare_next_token_ids_padded``);
2. the draft group's first pass over the verify window gives every member's logits at the
   served model's proposal and at the drafts before it that a member scored lazily
   (:mod:`vllm_cos.lazy`: the row's *pending chain*, :mod:`vllm_cos.adapters.chain`); r there
   gets the request's controls exactly as a draft position does; the lazily scored drafts are
   accepted with min(1, r/q), then ``alternate`` accepts the proposal with min(1, r/p) or
   replaces it from norm(max(0, r - p)), ``naive`` draws that position from r.  The result is
   written into the sampled-token tensor (-1 after a rejection), so nothing unverified is
   emitted;
3. if many rows' tokens changed (a quarter of the batch or more), one single-token pass
   re-feeds them; otherwise the changed rows draft from the proposal's context and their drafts
   are voided in the stash (never verified: exact, just not accepted), which saves a pass of the
   whole batch for a few rows.  Then the plan's members draft in turn, each from its proposal
   q (under lazy scoring, a member whose drafting is over skips the later passes), and every
   member's logits go to the draft stash.  A step that drafts nothing draws the
   verified position straight from r (no re-feed can follow, so T's proposal buys nothing).

vLLM internals touched: ``DraftModelProposer`` / ``SpecDecodeBaseProposer`` (``load_model``,
``_get_model``, ``_create_draft_vllm_config``, ``propose``, ``prepare_next_token_ids_padded``,
``set_inputs_first_pass``, ``initialize_attn_backend``, ``build_per_group_and_layer_attn_metadata``,
``build_model_inputs_first_pass``, ``_determine_batch_execution_and_padding``,
``_get_slot_mapping``, ``_update_positions_dependent_metadata``; attributes ``model``,
``input_ids``, ``positions``, ``arange``, ``token_arange_np``, ``block_size``,
``num_speculative_tokens``, ``vllm_config``), runner attributes (``rejection_sampler``,
``sampler``, ``input_batch.req_ids``, ``use_async_scheduling``, ``_input_fits_in_drafter``,
``discard_request_mask.np``),
``set_forward_context``, ``set_model_tag``, ``get_model``, ``get_tensor_model_parallel_rank`` (only
tensor-parallel rank 0 publishes metrics and answers ``cos_stats``: every rank counts the same tokens).
"""

from __future__ import annotations

import logging
import time
import weakref

import torch

from vllm_cos.adapters.chain import PendingChain
from vllm_cos.adapters.controls import RowLayout
from vllm_cos.adapters.core import CoSCore
from vllm_cos.adapters.prompt_logprobs import stash_group_scores
from vllm_cos.adapters.samplers import CoSPlainSampler, CoSRejectionSampler
from vllm_cos.adapters.stash import DraftStash
from vllm_cos.engine import SUPPORTED_RUNNER, config_from_additional
from vllm_cos.verify import verify

logger = logging.getLogger("vllm.cos")  # under vLLM's configured "vllm" logger

# Re-feed the verified tokens when at least 1/REFEED_SHARE of the rows changed them.
REFEED_SHARE = 4
# The counters gamma: auto's controller observes per step (DraftLengthController.observe's order).
_OBSERVED = ("drafts_accepted", "draft_rejections", "voided_rows", "drafted_rows")


# runner -> its CoSCore: how the module-level hooks (grammar mask, stash release) find a runner's step.
COS_RUNNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def core_for_batch(input_batch) -> CoSCore | None:
    """The CoS core of the runner whose current input batch this is (None outside CoS)."""
    for runner, core in list(COS_RUNNERS.items()):
        if getattr(runner, "input_batch", None) is input_batch:
            return core
    return None


def install_samplers(core: CoSCore, runner, max_requests: int, device) -> None:
    """Put the CoS samplers and the draft stash in place on a runner (at model load)."""
    if runner is None or not hasattr(runner, "rejection_sampler"):
        raise RuntimeError(f"cos: no model runner reached the proposer; CoS needs the {SUPPORTED_RUNNER}")
    if getattr(runner, "use_async_scheduling", False):
        raise RuntimeError(f"cos: async scheduling is on; CoS needs the {SUPPORTED_RUNNER}")
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    from vllm_cos.adapters.metrics import CoSMetrics

    core.stash = DraftStash(max_requests, len(core.plan), len(core.group), core.tokenizer_size, device)
    core.reporting = get_tensor_model_parallel_rank() == 0  # the other ranks count the same tokens
    if core.reporting:
        core.metrics = CoSMetrics(core.cfg.target, core.group_label)
        core.metrics.adaptive = core.draft_length is not None
    core.logprobs_mode = getattr(runner.sampler, "logprobs_mode", "raw_logprobs")
    runner.rejection_sampler = CoSRejectionSampler(runner.rejection_sampler, core, runner)
    runner.sampler = CoSPlainSampler(runner.sampler, core, runner)
    COS_RUNNERS[runner] = core
    # The group must score every step (its KV and its logits feed r): never skip the drafter.
    runner._input_fits_in_drafter = lambda common_attn_metadata: common_attn_metadata is not None
    if not core.reporting:
        return
    names = [core.cfg.models[core.group[k]].name for k in core.plan]
    logger.info("cos: %s schedule in vLLM: %s serves and proposes one token per step, then drafts per "
                "step: %s (draft group %s); draft stash %.1f MiB (%d B per request)", core.schedule,
                core.cfg.target, ", ".join(names) or "none", core.group_label, core.stash.nbytes / 2**20,
                core.stash.bytes_per_request())
    logger.info("cos: the 'CoS metrics' line counts every proposal verified against r (the group's drafts "
                "and %s's own proposals) and tokens per verification round; vLLM's 'SpecDecoding metrics' "
                "line counts only the draft group's drafts (its acceptance length = 1 + accepted drafts "
                "per step)", core.cfg.target)


class CoSProposerMixin:
    """The CoS overrides of vLLM's ``DraftModelProposer`` (see :func:`make_proposer_class`)."""

    def __init__(self, vllm_config, device, runner=None):
        super().__init__(vllm_config, device, runner=runner)
        carried = config_from_additional(vllm_config.additional_config)
        self.cos_core = None if carried is None else CoSCore(*carried)
        self.cos_runner = runner
        self._cos_last_step = None  # gamma: auto -- (time, batch, k, drafts accepted, rejections)
        self._cos_chosen = None  # (step index, k) chosen by cos_close_fused_step for a drafting step

    def load_model(self, target_model) -> None:
        super().load_model(target_model)
        core = self.cos_core
        if core is None:
            return
        if self.num_speculative_tokens != len(core.plan):
            raise RuntimeError(f"cos: vLLM schedules {self.num_speculative_tokens} draft tokens per "
                               f"step but the CoS plan has {len(core.plan)}")
        install_samplers(core, self.cos_runner, self.vllm_config.scheduler_config.max_num_seqs,
                         self.device)

    def prepare_next_token_ids_padded(self, sampled_token_ids, requests, gpu_input_batch,
                                      discard_request_mask):
        if self.cos_core is not None:
            self.cos_core.steps.attach_sampled(sampled_token_ids, discard_request_mask)
        return super().prepare_next_token_ids_padded(sampled_token_ids, requests, gpu_input_batch,
                                                     discard_request_mask)

    def _get_model(self):
        """The draft group (every collaborator but the served one) as one vLLM model."""
        if self.cos_core is None:
            return super()._get_model()
        from vllm.compilation.backends import set_model_tag
        from vllm.config.utils import replace
        from vllm.model_executor.model_loader import get_model

        from vllm_cos.adapters.member_stack import member_model_config
        from vllm_cos.engine import DRAFT_GROUP_ARCH

        core = self.cos_core
        draft_config = self._create_draft_vllm_config()
        first = core.cfg.models[core.group[0]]
        group_config = member_model_config(draft_config, first.path,
                                           hf_overrides={"architectures": [DRAFT_GROUP_ARCH]})
        with set_model_tag("draft_model"):
            return get_model(vllm_config=replace(draft_config, model_config=group_config), prefix="draft_model")

    def initialize_attn_backend(self, kv_cache_config, kernel_block_sizes=None) -> None:
        super().initialize_attn_backend(kv_cache_config, kernel_block_sizes)
        if self.cos_core is not None:
            from vllm_cos.adapters.kv_share import log_kv_share

            log_kv_share(self.cos_core, kv_cache_config)

    def _forward(self, common_attn_metadata, num_tokens: int, slot_mapping, first_pass: bool, members=None):
        from vllm.forward_context import set_forward_context

        _, per_layer = self.build_per_group_and_layer_attn_metadata(common_attn_metadata)
        mode, num_input_tokens, across_dp = self._determine_batch_execution_and_padding(num_tokens)
        if first_pass:
            kwargs, slot_size = self.build_model_inputs_first_pass(num_tokens, num_input_tokens, None)
        else:
            kwargs = {"input_ids": self.input_ids[:num_input_tokens],
                      "positions": self.positions[:num_input_tokens], "inputs_embeds": None}
            slot_size = num_input_tokens
        with set_forward_context(per_layer, self.vllm_config, num_tokens=num_input_tokens,
                                 num_tokens_across_dp=across_dp, cudagraph_runtime_mode=mode,
                                 slot_mapping=self._get_slot_mapping(slot_size, slot_mapping)):
            hidden = self.model(**kwargs) if members is None else self.model(**kwargs, cos_members=members)
        if isinstance(hidden, tuple):
            hidden = hidden[0]
        self.cos_core.stats.add("draft_forwards", 1)
        return hidden

    def _single_token_pass(self, cad, token_ids, current_positions, batch, members=None):
        """One token per row at ``current_positions + 1`` (KV written, hidden returned);
        ``members``: only these draft-group members run (None: all)."""
        self.input_ids[:batch] = token_ids.to(self.input_ids.dtype)
        positions = self._update_positions_dependent_metadata(
            current_positions, cad, batch, batch, self.block_size)
        hidden = self._forward(cad, batch, None, first_pass=False, members=members)[:batch]
        return hidden, positions

    def _verify_proposals(self, step, hidden, token_indices, next_token_ids, batch, direct: bool = False):
        """r at each row's pending tokens (lazily scored drafts, then the served proposal), from
        the first pass's ``hidden``; writes the verified tokens into the sampled-token tensor.
        Returns (the row's last token [B], slots dropped after it [B] or None when no row had
        lazily scored drafts); under ``naive`` or when ``direct`` the proposal's position is
        drawn from r itself."""
        core, sampling = self.cos_core, step.sampling
        chain = PendingChain.of(step.proposals, batch)
        live = step.proposals.rows[:batch]
        if step.discard is not None:
            live = live & ~step.discard[:batch].bool()
        rows = torch.arange(batch, device=live.device)
        slots = chain.slots()  # [B, L]
        tokens = step.sampled[rows.unsqueeze(1), slots].long()  # [B, L]
        at = token_indices.unsqueeze(1) - 1  # the inputs before the proposals, and before the drafts
        if chain.pending:
            at = at - chain.count.unsqueeze(1) + chain.offset
        group_logits = self.model.member_logits(hidden[at.view(-1)])  # [M, B*L, V]
        column_rows = rows if chain.width == 1 else rows.repeat_interleave(chain.width)  # [B*L]
        layout = RowLayout(column_rows, slots.reshape(-1))
        log_r = core.combine(chain.target_logits.reshape(-1, core.tokenizer_size), group_logits,
                             step.controls.rule_params(layout))
        r = sampling.probs(step.controls.apply(log_r, layout, chain.grammar_rows()), layout)
        final = core.schedule == "naive" or direct
        out = chain.verify(r.view(batch, chain.width, -1), tokens, live, sampling, layout, final)
        self._count_chain(chain, out, live, final)
        new = torch.where(live.unsqueeze(1), out.token_ids, tokens)  # [B, L]
        if step.logprobs is not None:
            self._fill_logprobs(step.logprobs, layout, live[column_rows], log_r, r, new.reshape(-1))
        step.sampled[rows.unsqueeze(1), slots] = new.to(step.sampled.dtype)
        if not chain.pending:  # one token per live row, at the proposal's slot
            return new[:, 0], None
        last = torch.where(live, new[rows, (out.num_emitted - 1).clamp(min=0)], next_token_ids[:batch].long())
        return last, torch.where(live, chain.count + 1 - out.num_emitted, 0)

    def _count_chain(self, chain, out, live, final: bool) -> None:
        stats = self.cos_core.stats
        if not chain.pending:  # the proposals only, one token each
            if not final:
                stats.add("served_proposed", live.sum())
                stats.add("served_accepted", (live & (out.num_accepted > 0)).sum())
            return
        count = torch.where(live, chain.count, 0)
        drafts_accepted = torch.minimum(out.num_accepted, count)
        stats.add("drafts_proposed", count.sum())
        stats.add("drafts_accepted", drafts_accepted.sum())
        stats.add("draft_rejections", (drafts_accepted < count).sum())
        stats.add("tokens_emitted", -(torch.where(live, chain.count + 1 - out.num_emitted, 0).sum()))
        if not final:
            reached = live & (drafts_accepted == count)
            stats.add("served_proposed", reached.sum())
            stats.add("served_accepted", (reached & (out.num_accepted > count)).sum())

    def _fill_logprobs(self, target, layout, live, log_r, r, tokens):
        """r's logprobs at the rows ``layout`` (flat) where ``live``, into the step's tensors."""
        fresh = self.cos_core.logprob_rows(log_r, r, tokens, target.num_logprobs)
        index = layout.request * target.width + layout.position
        t = target.tensors
        for name in ("logprob_token_ids", "logprobs", "selected_token_ranks"):
            old, new = getattr(t, name)[index], getattr(fresh, name)
            keep = live.view(-1, *([1] * (old.dim() - 1)))
            getattr(t, name)[index] = torch.where(keep, new.to(old.dtype), old)

    def _draft(self, cad, last_hidden, positions, sampling, gamma, batch, first_offset):
        """The plan's gamma drafts [B, gamma] and every member's logits [B, gamma, M, V] (0 for a
        member lazy scoring left out there); draft j of request i is its output position
        emitted + ``first_offset[i]`` + j."""
        core = self.cos_core
        draft_ids, member_logits = [], []
        members = [None] + core.pass_members(gamma)  # who ran the pass giving each position
        for j in range(gamma):
            group_logits = self.model.member_logits(last_hidden, members[j])  # [M, B, V]
            q = core.proposal_probs(group_logits[core.plan[j]], sampling)
            token = sampling.sample(q, first_offset + j, one_hot_if_greedy=core.proposal_mode != "raw")
            draft_ids.append(token)
            member_logits.append(group_logits)
            if j + 1 < gamma:
                last_hidden, positions = self._single_token_pass(cad, token, positions, batch, members[j + 1])
        core.stats.add("member_passes_skipped", core.member_passes_saved(gamma))
        return torch.stack(draft_ids, dim=1), torch.stack(member_logits, dim=0).permute(2, 0, 1, 3)

    def propose(self, num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
                next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
                mm_embed_inputs=None, num_rejected_tokens_gpu=None, slot_mappings=None):
        core = self.cos_core
        if core is None:
            return super().propose(num_speculative_tokens, target_token_ids, target_positions,
                                   target_hidden_states, next_token_ids, token_indices_to_sample,
                                   common_attn_metadata, sampling_metadata, mm_embed_inputs,
                                   num_rejected_tokens_gpu, slot_mappings)
        self.num_speculative_tokens = num_speculative_tokens
        self._last_draft_probs = None
        batch = common_attn_metadata.batch_size()
        query_len = common_attn_metadata.max_query_len  # before set_inputs_first_pass rewrites it
        req_ids = tuple(self.cos_runner.input_batch.req_ids[:batch])
        step = core.steps.consume(req_ids)
        if step.fused:  # tokens final, drawn from r: no first pass to verify them
            gamma = self._fused_draft_length(step, batch, num_speculative_tokens, query_len)
            self._uncount_discarded(step, batch)
            drafts = torch.empty(batch, 0, dtype=torch.int64, device=next_token_ids.device)
            if gamma:  # drafts again: re-feed the sampled tokens first
                _, token_indices, cad = self.set_inputs_first_pass(
                    target_token_ids=target_token_ids, next_token_ids=next_token_ids,
                    target_positions=target_positions, target_hidden_states=target_hidden_states,
                    token_indices_to_sample=token_indices_to_sample, cad=common_attn_metadata,
                    num_rejected_tokens_gpu=num_rejected_tokens_gpu)
                drafts = self._draft_after(cad, None, token_indices[:batch].long(), next_token_ids[:batch].long(),
                                           next_token_ids, step, batch, gamma, num_rejected_tokens_gpu)
            return self._published(drafts)
        num_tokens, token_indices, cad = self.set_inputs_first_pass(
            target_token_ids=target_token_ids, next_token_ids=next_token_ids,
            target_positions=target_positions, target_hidden_states=target_hidden_states,
            token_indices_to_sample=token_indices_to_sample, cad=common_attn_metadata,
            num_rejected_tokens_gpu=num_rejected_tokens_gpu)
        hidden = self._forward(cad, num_tokens, cad.slot_mapping, first_pass=True)
        stash_group_scores(core, self.cos_runner, common_attn_metadata, cad, hidden, self.model.member_logits)
        token_indices = token_indices[:batch].long()
        gamma = self._draft_length(batch, num_speculative_tokens, query_len)
        tokens, back = self._verify_proposals(step, hidden, token_indices, next_token_ids, batch, direct=gamma == 0)
        self._uncount_discarded(step, batch)
        drafts = self._draft_after(cad, hidden[token_indices], token_indices, tokens, next_token_ids, step,
                                   batch, gamma, num_rejected_tokens_gpu, back)
        return self._published(drafts)

    def cos_close_fused_step(self, sampled_token_ids, discard_mask, common_attn_metadata, max_drafts: int):
        """The runner's shortcut (:func:`vllm_cos.adapters.fusion.propose_hook`): after a fused
        step whose next step drafts nothing either, close the step without vLLM's drafter
        preparation (next-token ids, padded inputs) and return no drafts [B, 0].  None when this
        is not such a step; the k chosen for a fused step that drafts is kept for :meth:`propose`."""
        core = self.cos_core
        step = None if core is None else core.steps.current
        if step is None or step.consumed or not step.fused or core.draft_length is None:
            return None
        batch = common_attn_metadata.batch_size()
        gamma = self._draft_length(batch, max_drafts, common_attn_metadata.max_query_len)
        if gamma:
            self._cos_chosen = (step.index, gamma)
            return None
        core.steps.attach_sampled(sampled_token_ids, discard_mask)
        step = core.steps.consume(self.cos_runner.input_batch.req_ids[:batch])
        self._uncount_discarded(step, batch)
        return self._published(torch.empty(batch, 0, dtype=torch.int64, device=sampled_token_ids.device))

    def _fused_draft_length(self, step, batch: int, max_drafts: int, query_len: int) -> int:
        """A fused step's k: the one :meth:`cos_close_fused_step` chose for it, else chosen now."""
        chosen, self._cos_chosen = self._cos_chosen, None
        if chosen is not None and chosen[0] == step.index:
            return chosen[1]
        return self._draft_length(batch, max_drafts, query_len)

    def _published(self, drafts):
        """The step's drafts, once its counters are published (metrics, log line)."""
        if self.cos_core.metrics is not None:
            self.cos_core.metrics.publish(self.cos_core.stats)
        return drafts

    def _uncount_discarded(self, step, batch: int) -> None:
        """Partial prefill chunks emitted nothing after all (counted from the runner's host copy
        of the mask when it has one: no device read, and nothing to add in a decode step)."""
        if step.discard is None:
            return
        host = getattr(getattr(self.cos_runner, "discard_request_mask", None), "np", None)
        if host is None:  # a runner without the host copy: count on the device
            discarded = step.discard[:batch].bool().sum()
        else:
            discarded = int(host[:batch].sum())
            if not discarded:
                return
        self.cos_core.stats.add("tokens_emitted", -discarded)
        self.cos_core.stats.add("row_steps", -discarded)

    def _draft_length(self, batch: int, max_drafts: int, query_len: int) -> int:
        """This step's number of drafts: fixed, or chosen from measured cost and acceptance (a
        seeded request's text does not depend on it: vllm_cos.coupling); ``query_len``: the
        most tokens a request scheduled this step (more than 1 + its drafts: a prefill chunk)."""
        controller = self.cos_core.draft_length
        if controller is None:
            return max_drafts
        now = time.perf_counter()
        counts = self.cos_core.stats.as_dict()
        last = self._cos_last_step
        if last is not None:  # the previous step: its k, batch, time, and what it left to verify
            t, last_batch, k, seen = last
            controller.observe(last_batch, k, now - t, *(counts[name] - seen[name] for name in _OBSERVED),
                               decode_only=query_len <= 1 + k)
        before = controller.chosen()
        k = min(controller.choose(batch), max_drafts)
        self.cos_core.fusion.wanted = k == 0  # the next step may then fuse (vllm_cos.adapters.fusion)
        if controller.chosen() != before and self.cos_core.metrics is not None:
            self.cos_core.metrics.draft_lengths(controller.chosen(), controller.acceptance)
        self._cos_last_step = (now, batch, k, {name: counts[name] for name in _OBSERVED})
        return k

    def _draft_after(self, cad, last_hidden, token_indices, tokens, next_token_ids, step, batch, gamma,
                     num_rejected_tokens_gpu, back=None):
        """From the verified tokens on: one token per row, the plan's drafts, the stash.
        ``last_hidden`` [B, H]: the first pass's hidden states at the proposals; None after a
        fused step (no first pass ran: every row is re-fed); ``back`` [B]: slots the verification
        dropped after each row's last token (a lazily scored draft rejected), or None."""
        positions = self.positions[token_indices].clone()
        cad.num_actual_tokens = batch
        cad.max_query_len = 1
        cad.query_start_loc = self.arange[: batch + 1]
        cad.query_start_loc_cpu = torch.from_numpy(self.token_arange_np[: batch + 1]).clone()
        if num_rejected_tokens_gpu is not None:
            cad.seq_lens -= num_rejected_tokens_gpu
        if gamma == 0:
            return torch.empty(batch, 0, dtype=torch.int64, device=tokens.device)
        void, num_changed = None, 0
        if last_hidden is not None:
            changed = tokens != next_token_ids[:batch].long()  # [B]
            if back is not None:
                changed = changed | (back > 0)
            num_changed = int(changed.sum())  # one host sync per step
        back = 0 if back is None else back
        if last_hidden is None or (num_changed and num_changed * REFEED_SHARE >= batch):
            # Re-feed the verified token at its position (overwrites the proposal's KV there).
            cad.seq_lens -= back + 1
            cad.max_seq_len = max(cad.max_seq_len - 1, 1)
            last_hidden, positions = self._single_token_pass(cad, tokens, positions - back - 1, batch)
        elif num_changed:
            # Drafted after the proposal, not the verified token: their stashed logits are not
            # r's inputs there, so they are never verified (the next step's first pass rewrites
            # the KV of the verified token).
            void = changed
            self.cos_core.stats.add("voided_rows", num_changed)
        self.cos_core.stats.add("drafted_rows", batch)
        drafts, member_logits = self._draft(cad, last_hidden, positions, step.sampling, gamma, batch,
                                            step.proposals.slot[:batch] - back + 1)
        self.cos_core.stash.put(step.req_ids, drafts, member_logits, void, self.cos_core.complete_drafts(gamma))
        return drafts


def make_proposer_class(stock_class):
    """CoSProposer: the CoS overrides on the stock DraftModelProposer (isinstance checks pass)."""
    return type("CoSProposer", (CoSProposerMixin, stock_class), {"__module__": __name__})
