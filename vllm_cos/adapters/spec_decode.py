"""Hook: naive / alternate CoS on vLLM's ``draft_model`` speculative decoding (V1 runner).

Supported runner: see :data:`vllm_cos.engine.SUPPORTED_RUNNER` (checked in
:meth:`CoSProposer.load_model`).

T = the served model; G = the draft group, every other collaborator (1 to 3 models) held in
one :class:`~vllm_cos.adapters.member_stack.CoSDraftGroupForCausalLM`; every drafter pass
runs all of G's members on the same tokens, so each member's logits are known at every
position.  The step's drafts follow :func:`vllm_cos.engine.draft_plan` (``alternate``: each
member drafts its gamma tokens in turn; ``naive``: the proposer drafts its gamma).

One engine step, per request (row):

1. T scores its window ``[t0, d_1..d_k]`` (k drafts proposed by G in the previous step).
2. :class:`CoSRejectionSampler` (``runner.rejection_sampler``) builds
   r_j = C(T raw logits, every G member's raw logits) at every draft position (G's logits
   were kept by the proposer when it drafted), tempers r with the request's sampling
   parameters, and calls :func:`vllm_cos.verify.verify` with the distribution each draft was
   really sampled from.  On a rejection it emits the residual token.  If every draft is
   accepted it samples a *bonus* b from T's own tempered p at the next position -- b is a
   proposal of T, not yet an output token.  Steps without drafts go through
   :class:`CoSPlainSampler` (``runner.sampler``), which samples b the same way (prefill).
3. :class:`CoSProposer` (the ``DraftModelProposer`` the runner builds) runs in the same step,
   before the runner's bookkeeping.  Its first pass over the window gives G's raw logits at
   b's position, so r is known there: ``alternate`` accepts b with min(1, r(b)/p(b)) or
   resamples from norm(max(0, r - p)); ``naive`` samples that position from r directly.
   The result is written into the sampled-token tensor the bookkeeping reads next, so a
   bonus token is never emitted before G has verified it and no state crosses steps except
   G's drafts (which vLLM drops on preemption; then nothing is verified against them).
   If a row's token changed, one single-token G pass re-feeds it, then G drafts the plan's
   tokens, each from its drafter's proposal q (its own p tempered like r, or raw), keeping
   every member's raw logits and q.

vLLM internals touched: ``vllm.v1.worker.gpu_model_runner.DraftModelProposer`` (module
global the runner instantiates), ``DraftModelProposer`` / ``SpecDecodeBaseProposer`` methods
(``load_model``, ``propose``, ``prepare_next_token_ids_padded``, ``set_inputs_first_pass``,
``build_per_group_and_layer_attn_metadata``, ``build_model_inputs_first_pass``,
``_determine_batch_execution_and_padding``, ``_get_slot_mapping``,
``_update_positions_dependent_metadata``, attributes ``model``, ``input_ids``, ``positions``,
``arange``, ``token_arange_np``, ``block_size``, ``vllm_config``), runner attributes
(``rejection_sampler``, ``sampler``, ``input_batch.req_ids``, ``use_async_scheduling``,
``_input_fits_in_drafter``), ``SpecDecodeMetadata`` fields, ``SamplingMetadata`` fields,
``SamplerOutput``, ``set_forward_context``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from vllm_cos.combine import build_combiner
from vllm_cos.engine import SUPPORTED_RUNNER, config_from_additional, draft_plan
from vllm_cos.sampling import apply_sampling_params, draw_uniforms, sample_from_probs
from vllm_cos.verify import verify

logger = logging.getLogger("vllm.cos")  # under vLLM's configured "vllm" logger


# ---------------------------------------------------------------------- shared state

@dataclass
class DraftStash:
    """What the draft group proposed for one request: ids, every member's raw logits at each
    draft position, and the proposal q each draft was sampled from."""

    token_ids: list[int]
    raw_logits: torch.Tensor  # [num_drafts, num_members, vocab]
    proposal: torch.Tensor  # [num_drafts, vocab]


@dataclass
class PendingBonus:
    """Rows whose last sampled token is T's bonus (a proposal D must verify this step)."""

    mask: torch.Tensor  # [B] bool
    slot: torch.Tensor  # [B] int64 column of that token in sampled_token_ids
    target_raw: torch.Tensor  # [B, vocab] T's raw logits at that position
    proposal: torch.Tensor  # [B, vocab] T's tempered p it was sampled from
    logprobs: "LogprobRows | None" = None  # rows to fill with r's logprobs once r is known


@dataclass
class LogprobRows:
    """The sampler output's logprobs tensors; row ``i * width + slot`` belongs to (i, slot)."""

    tensors: object  # vllm LogprobsTensors
    width: int
    num_logprobs: int


@dataclass
class CoSStats:
    steps: int = 0  # engine steps with CoS sampling (= forwards of the served model)
    draft_forwards: int = 0  # forwards of the other model (first passes, corrections, drafts)
    drafts_proposed: int = 0  # D's drafts verified by T
    drafts_accepted: int = 0
    bonus_proposed: int = 0  # T's bonus tokens verified by D
    bonus_accepted: int = 0
    tokens_emitted: int = 0
    row_steps: int = 0  # (request, step) pairs that emitted tokens: verification rounds

    def as_dict(self) -> dict:
        proposed = self.drafts_proposed + self.bonus_proposed
        accepted = self.drafts_accepted + self.bonus_accepted
        return {
            "steps": self.steps, "draft_forwards": self.draft_forwards,
            "drafts_proposed": self.drafts_proposed, "drafts_accepted": self.drafts_accepted,
            "bonus_proposed": self.bonus_proposed, "bonus_accepted": self.bonus_accepted,
            "tokens_emitted": self.tokens_emitted, "row_steps": self.row_steps,
            "acceptance_rate": accepted / proposed if proposed else 0.0,
            "mean_tokens_per_step": self.tokens_emitted / self.steps if self.steps else 0.0,
            "mean_accepted_length": self.tokens_emitted / self.row_steps if self.row_steps else 0.0,
        }


class CoSCore:
    """The CoS configuration bound to one worker: the models' roles and the rule.

    ``group`` = config indices of the draft group's members (every model but the served
    one, in config order); ``plan`` = for each draft token of a step, the position in
    ``group`` of the member that drafts it (:func:`vllm_cos.engine.draft_plan`).
    """

    def __init__(self, cfg, tokenizer_size: int):
        self.cfg = cfg
        self.tokenizer_size = tokenizer_size
        self.target_index = cfg.index(cfg.target)
        self.group = [i for i in range(len(cfg.models)) if i != self.target_index]
        self.plan = [self.group.index(i) for i in draft_plan(cfg)]
        self.group_label = "+".join(cfg.models[i].name for i in self.group)
        self.combiner = build_combiner(cfg.rule, cfg.model_names)
        self.schedule = cfg.schedule
        self.proposal_mode = cfg.proposal
        self.stash: dict[str, DraftStash] = {}
        self.pending: PendingBonus | None = None
        self.stats = CoSStats()
        self.logprobs_mode = "raw_logprobs"
        self.metrics = None  # CoSMetrics, set in the worker
        self._warned_processors = False

    def combine(self, target_raw: torch.Tensor, group_raw: torch.Tensor) -> torch.Tensor:
        """log r [N, vocab] from T's raw logits [N, vocab] and the group's [num_members, N, vocab]."""
        members = [None] * (len(self.group) + 1)
        members[self.target_index] = target_raw.float()
        for position, index in enumerate(self.group):
            members[index] = group_raw[position].float()
        return self.combiner(torch.stack(members))

    def logprob_rows(self, log_r: torch.Tensor, r: torch.Tensor, tokens: torch.Tensor, num_logprobs: int):
        """vLLM ``LogprobsTensors`` of r at N positions for the emitted ``tokens`` [N].

        Follows the sampler's ``logprobs_mode`` as the stock path does for the served model:
        ``raw_logprobs`` (default) = log r before the request's temperature / top-k / top-p
        (what the ``standard`` schedule reports), ``raw_logits`` = the rule's combined logits,
        ``processed_*`` = log of r after temperature / top-k / top-p.
        """
        from vllm.v1.sample.sampler import Sampler

        if self.logprobs_mode in ("processed_logprobs", "processed_logits"):
            lp = torch.log(r.float())
        elif self.logprobs_mode == "raw_logits":
            lp = log_r.float()
        else:
            lp = torch.log_softmax(log_r.float(), dim=-1)
        k = lp.shape[-1] if num_logprobs < 0 else num_logprobs
        return Sampler.gather_logprobs(lp, k, tokens.clamp(min=0).long())

    def crop(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., : self.tokenizer_size].float()

    def warn_unsupported(self, sampling_metadata) -> None:
        if self._warned_processors:
            return
        if (not getattr(sampling_metadata, "no_penalties", True)
                or getattr(sampling_metadata, "bad_words_token_ids", None)
                or getattr(sampling_metadata, "allowed_token_ids_mask", None) is not None):
            logger.warning("cos: penalties, bad_words and allowed_token_ids are not applied to r "
                           "in CoS speculative schedules (use schedule 'standard' for them)")
            self._warned_processors = True


class RowParams:
    """Per-row temperature / top-k / top-p / generator of a batch of B requests."""

    def __init__(self, sampling_metadata, batch: int, device):
        sm = sampling_metadata
        if sm.temperature is None:
            self.temperature = torch.zeros(batch, device=device)
        else:
            self.temperature = sm.temperature[:batch].float()
        self.top_k = None if sm.top_k is None else sm.top_k[:batch]
        self.top_p = None if sm.top_p is None else sm.top_p[:batch]
        gens = sm.generators or {}
        self.generators = [gens.get(i) for i in range(batch)]

    def select(self, rows: torch.Tensor) -> "RowParams":
        out = RowParams.__new__(RowParams)
        idx = rows.tolist()
        out.temperature = self.temperature[rows]
        out.top_k = None if self.top_k is None else self.top_k[rows]
        out.top_p = None if self.top_p is None else self.top_p[rows]
        out.generators = [self.generators[i] for i in idx]
        return out

    def temper(self, logits: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        """apply_sampling_params with row i's parameters on rows [i*repeat, (i+1)*repeat)."""
        def rep(t):
            return None if t is None else t.repeat_interleave(repeat)
        return apply_sampling_params(logits, rep(self.temperature), rep(self.top_k), rep(self.top_p))

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        uniforms = torch.cat(draw_uniforms([1] * probs.shape[0], self.generators, probs.device))
        return sample_from_probs(probs, uniforms)


def log_kv_share(core: CoSCore, kv_cache_config, runner) -> None:
    """One start-up line: how many tokens of KV fit, for every collaborator alike.

    Served and draft-group layers share one block table (vLLM sums every layer's page size
    per block), so a block holds a slot of every model: the token capacity is the same for
    all of them and each model's share of the memory is its KV bytes per token.
    """
    from vllm_cos.adapters.member_stack import member_attr
    from vllm_cos.engine import kv_share_line

    names = core.cfg.model_names
    markers = {member_attr(i): name for i, name in enumerate(names)}
    bytes_per_token: dict[str, int] = {name: 0 for name in names}
    block_size = None
    for group in kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        block_size = block_size or spec.block_size
        per_layer = getattr(spec, "kv_cache_specs", None)
        for layer in group.layer_names:
            layer_spec = per_layer[layer] if per_layer else spec
            owner = next((n for marker, n in markers.items() if marker in layer), core.cfg.target)
            bytes_per_token[owner] += layer_spec.page_size_bytes // layer_spec.block_size
    logger.info("%s", kv_share_line(bytes_per_token, block_size or 0, kv_cache_config.num_blocks,
                                    len(kv_cache_config.kv_cache_groups)))


# ---------------------------------------------------------------------- samplers

def _sampler_output(token_ids: torch.Tensor, logprobs_tensors=None):
    from vllm.v1.outputs import SamplerOutput

    return SamplerOutput(sampled_token_ids=token_ids.to(torch.int32), logprobs_tensors=logprobs_tensors)


class CoSPlainSampler:
    """``runner.sampler`` for steps without drafts: b ~ T's tempered p, pending for D."""

    def __init__(self, stock_sampler, core: CoSCore):
        self._stock = stock_sampler
        self._core = core

    def __getattr__(self, name):  # logprobs helpers, logprobs_mode, ... stay stock
        return getattr(self._stock, name)

    def __call__(self, logits: torch.Tensor, sampling_metadata, **kwargs):
        core = self._core
        core.warn_unsupported(sampling_metadata)
        batch = logits.shape[0]
        params = RowParams(sampling_metadata, batch, logits.device)
        target_raw = core.crop(logits)
        proposal = params.temper(target_raw)
        bonus = params.sample(proposal)
        rows = None
        if sampling_metadata.max_num_logprobs is not None:
            # T's p for now; the proposer overwrites each row with r once D has scored it.
            k = sampling_metadata.max_num_logprobs
            rows = LogprobRows(core.logprob_rows(target_raw, proposal, bonus, k), 1, k)
        core.pending = PendingBonus(mask=torch.ones(batch, dtype=torch.bool, device=logits.device),
                                    slot=torch.zeros(batch, dtype=torch.long, device=logits.device),
                                    target_raw=target_raw, proposal=proposal, logprobs=rows)
        core.stats.steps += 1
        core.stats.tokens_emitted += batch
        core.stats.row_steps += batch
        return _sampler_output(bonus.unsqueeze(1), None if rows is None else rows.tensors)


class CoSRejectionSampler:
    """``runner.rejection_sampler``: verify D's drafts against r, then T's bonus (pending)."""

    def __init__(self, stock_rejection_sampler, core: CoSCore, runner):
        self._stock = stock_rejection_sampler
        self._core = core
        self._runner = runner

    def __getattr__(self, name):
        return getattr(self._stock, name)

    def __call__(self, metadata, draft_probs, logits: torch.Tensor, sampling_metadata):
        core = self._core
        core.warn_unsupported(sampling_metadata)
        device = logits.device
        num_drafts = list(metadata.num_draft_tokens)
        batch, max_drafts = len(num_drafts), metadata.max_spec_len
        req_ids = list(self._runner.input_batch.req_ids[:batch])
        req_ids += [None] * (batch - len(req_ids))  # profiling runs have no requests
        vocab = core.tokenizer_size
        params = RowParams(sampling_metadata, batch, device)
        num_members = len(core.group)

        # T's logits row for each (row, position): the row's drafts, then its bonus row.
        counts = torch.tensor(num_drafts, dtype=torch.long)  # [B]
        position = torch.arange(max_drafts + 1)  # [K+1]
        is_draft = position < counts.unsqueeze(1)  # [B, K+1]
        flat = ((counts.cumsum(0) - counts).unsqueeze(1) + position).clamp(max=max(int(counts.sum()) - 1, 0))
        target_idx = metadata.target_logits_indices.cpu().long()  # [num_drafts_total]
        scheduled = metadata.draft_token_ids.cpu().long()  # [num_drafts_total]
        if target_idx.numel() == 0:
            target_idx = scheduled = torch.zeros(1, dtype=torch.long)
        bonus_idx = metadata.bonus_logits_indices.cpu().long()  # [B]
        row_index = torch.where(is_draft, target_idx[flat], bonus_idx.unsqueeze(1))  # [B, K+1]
        scheduled_drafts = torch.where(is_draft, scheduled[flat], -1)[:, :max_drafts]  # [B, K]

        # The group's stash (its drafts, logits and q); usable = leading drafts vLLM kept as proposed.
        stashed_ids = torch.full((batch, max_drafts), -2, dtype=torch.long)
        group_raw = torch.zeros(batch, max_drafts, num_members, vocab, device=device)
        proposal = torch.zeros(batch, max_drafts, vocab, device=device)
        for i, req_id in enumerate(req_ids):  # one dict lookup per request
            stash = core.stash.pop(req_id, None)
            if stash is not None:
                n = min(len(stash.token_ids), max_drafts)
                stashed_ids[i, :n] = torch.tensor(stash.token_ids[:n], dtype=torch.long)
                group_raw[i, :n] = stash.raw_logits[:n]
                proposal[i, :n] = stash.proposal[:n]
        usable = (stashed_ids == scheduled_drafts).long().cumprod(dim=1).sum(dim=1)  # [B]
        if bool((usable < counts).any()):  # drafts past a mismatch are dropped; T's bonus follows
            logger.debug("cos: %d of %d scheduled drafts match the group's proposals",
                         int(usable.sum()), int(counts.sum()))
        drafts = torch.where(position[:max_drafts] < usable.unsqueeze(1), scheduled_drafts, 0)  # [B, K]
        target_rows = core.crop(logits[row_index.to(device).view(-1)]).view(batch, max_drafts + 1, vocab)

        log_r = None
        if max_drafts > 0:
            log_r = core.combine(target_rows[:, :max_drafts].reshape(-1, vocab),
                                 group_raw.view(-1, num_members, vocab).transpose(0, 1))
            r = params.temper(log_r, repeat=max_drafts).view(batch, max_drafts, vocab)
            r = torch.cat([r, torch.zeros(batch, 1, vocab, device=device)], dim=1)
            out = verify(drafts.to(device), usable.to(device), proposal, r,
                         torch.zeros(batch, dtype=torch.bool, device=device), params.generators)
            token_ids, accepted, rejected = out.token_ids, out.num_accepted, out.rejected
        else:
            token_ids = torch.full((batch, 1), -1, dtype=torch.long, device=device)
            accepted = torch.zeros(batch, dtype=torch.long, device=device)
            rejected = torch.zeros(batch, dtype=torch.bool, device=device)

        # T's bonus where every usable draft was accepted: a proposal for D to verify.
        rows = torch.arange(batch, device=device)
        bonus_raw = target_rows[rows, accepted]
        bonus_p = params.temper(bonus_raw)
        bonus = params.sample(bonus_p)
        token_ids[rows, accepted] = torch.where(rejected, token_ids[rows, accepted], bonus)
        logprob_rows = None
        if sampling_metadata.max_num_logprobs is not None:
            # r at draft positions; T's p at the bonus slot until the proposer has r there.
            k = sampling_metadata.max_num_logprobs
            width = max_drafts + 1
            all_log_r = bonus_raw.unsqueeze(1).repeat(1, width, 1)
            all_r = bonus_p.unsqueeze(1).repeat(1, width, 1)
            if max_drafts > 0:
                all_log_r[:, :max_drafts] = log_r.view(batch, max_drafts, vocab)
                all_r[:, :max_drafts] = r[:, :max_drafts]
            tensors = core.logprob_rows(all_log_r.view(-1, vocab), all_r.view(-1, vocab), token_ids.view(-1), k)
            logprob_rows = LogprobRows(tensors, width, k)
        core.pending = PendingBonus(mask=~rejected, slot=accepted, target_raw=bonus_raw, proposal=bonus_p,
                                    logprobs=logprob_rows)

        stats = core.stats
        stats.steps += 1
        stats.row_steps += batch
        stats.drafts_proposed += int(usable.sum())
        stats.drafts_accepted += int(accepted.sum())
        stats.tokens_emitted += int((token_ids >= 0).sum())
        return _sampler_output(token_ids, None if logprob_rows is None else logprob_rows.tensors)


# ---------------------------------------------------------------------- proposer

def make_proposer_class(stock_class):
    """CoSProposer as a subclass of the stock DraftModelProposer (isinstance checks pass)."""

    class CoSProposer(stock_class):
        def __init__(self, vllm_config, device, runner=None):
            super().__init__(vllm_config, device, runner=runner)
            carried = config_from_additional(vllm_config.additional_config)
            self.cos_core = None if carried is None else CoSCore(*carried)
            self.cos_runner = runner
            self._cos_sampled = None
            self._cos_discard = None

        # -------------------------------------------------------------- wiring
        def load_model(self, target_model) -> None:
            super().load_model(target_model)
            core, runner = self.cos_core, self.cos_runner
            if core is None:
                return
            if runner is None or not hasattr(runner, "rejection_sampler"):
                raise RuntimeError(f"cos: no model runner reached the proposer; CoS needs the {SUPPORTED_RUNNER}")
            if getattr(runner, "use_async_scheduling", False):
                raise RuntimeError(f"cos: async scheduling is on; CoS needs the {SUPPORTED_RUNNER}")
            runner.rejection_sampler = CoSRejectionSampler(runner.rejection_sampler, core, runner)
            from vllm_cos.adapters.metrics import CoSMetrics

            core.metrics = CoSMetrics(core.cfg.target, core.group_label)
            core.logprobs_mode = getattr(runner.sampler, "logprobs_mode", "raw_logprobs")
            runner.sampler = CoSPlainSampler(runner.sampler, core)
            if self.num_speculative_tokens != len(core.plan):
                raise RuntimeError(f"cos: vLLM schedules {self.num_speculative_tokens} draft tokens per "
                                   f"step but the CoS plan has {len(core.plan)}")
            # D must score every step (its KV and its logits feed r): never skip the drafter.
            runner._input_fits_in_drafter = lambda common_attn_metadata: common_attn_metadata is not None
            names = [core.cfg.models[core.group[k]].name for k in core.plan]
            logger.info("cos: %s schedule in vLLM: %s serves and proposes its bonus token, then "
                        "drafts per step: %s (draft group %s)", core.schedule, core.cfg.target,
                        ", ".join(names), core.group_label)

        def prepare_next_token_ids_padded(self, sampled_token_ids, requests, gpu_input_batch,
                                          discard_request_mask):
            self._cos_sampled = sampled_token_ids
            self._cos_discard = discard_request_mask
            return super().prepare_next_token_ids_padded(sampled_token_ids, requests, gpu_input_batch,
                                                         discard_request_mask)

        # -------------------------------------------------------------- helpers
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
                log_kv_share(self.cos_core, kv_cache_config, self.cos_runner)

        def _raw_logits(self, hidden: torch.Tensor) -> torch.Tensor:
            """Every group member's raw logits [num_members, N, vocab] at the N hidden rows."""
            return self.model.member_logits(hidden)

        def _forward(self, common_attn_metadata, num_tokens: int, slot_mapping, first_pass: bool):
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
                hidden = self.model(**kwargs)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
            self.cos_core.stats.draft_forwards += 1
            return hidden

        def _single_token_pass(self, cad, token_ids, current_positions, batch):
            """One token per row at ``current_positions + 1`` (KV written, hidden returned)."""
            self.input_ids[:batch] = token_ids.to(self.input_ids.dtype)
            positions = self._update_positions_dependent_metadata(
                current_positions, cad, batch, batch, self.block_size)
            hidden = self._forward(cad, batch, None, first_pass=False)[:batch]
            return hidden, positions

        def _verify_pending(self, hidden, token_indices, next_token_ids, params, batch):
            """r at the pending bonus position; returns the (possibly replaced) next tokens."""
            core = self.cos_core
            pending = core.pending
            core.pending = None
            tokens = next_token_ids[:batch].long().clone()
            if pending is None or pending.mask.shape[0] < batch:
                return tokens
            mask = pending.mask[:batch].clone()
            if self._cos_discard is not None:
                mask &= ~self._cos_discard[:batch].bool()
            rows = mask.nonzero().squeeze(-1)
            if rows.numel() == 0:
                return tokens
            group_raw = self._raw_logits(hidden[token_indices[rows].long() - 1])
            sub = params.select(rows)
            log_r = core.combine(pending.target_raw[rows], group_raw)
            r = sub.temper(log_r)
            bonus = tokens[rows]
            if core.schedule == "naive":
                new = sub.sample(r)
            else:
                out = verify(bonus.unsqueeze(1), torch.ones_like(bonus), pending.proposal[rows].unsqueeze(1),
                             torch.stack([r, torch.zeros_like(r)], dim=1),
                             torch.zeros_like(bonus, dtype=torch.bool), sub.generators)
                new = out.token_ids[:, 0]
                core.stats.bonus_proposed += int(rows.numel())
                core.stats.bonus_accepted += int((~out.rejected).sum())
            tokens[rows] = new
            if pending.logprobs is not None:
                self._fill_logprobs(pending.logprobs, rows * pending.logprobs.width + pending.slot[rows],
                                    log_r, r, new)
            if self._cos_sampled is not None:
                self._cos_sampled[rows, pending.slot[rows]] = new.to(self._cos_sampled.dtype)
            return tokens

        def _fill_logprobs(self, target: LogprobRows, index, log_r, r, tokens):
            fresh = self.cos_core.logprob_rows(log_r, r, tokens, target.num_logprobs)
            t = target.tensors
            t.logprob_token_ids[index] = fresh.logprob_token_ids.to(t.logprob_token_ids.dtype)
            t.logprobs[index] = fresh.logprobs.to(t.logprobs.dtype)
            t.selected_token_ranks[index] = fresh.selected_token_ranks.to(t.selected_token_ranks.dtype)

        def _propose_from(self, logits_raw, params, batch):
            core = self.cos_core
            if core.proposal_mode == "raw":
                q = torch.softmax(logits_raw, dim=-1)
            else:
                q = params.temper(logits_raw)
            return params.sample(q), q

        # -------------------------------------------------------------- one step
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
            num_tokens, token_indices, cad = self.set_inputs_first_pass(
                target_token_ids=target_token_ids, next_token_ids=next_token_ids,
                target_positions=target_positions, target_hidden_states=target_hidden_states,
                token_indices_to_sample=token_indices_to_sample, cad=common_attn_metadata,
                num_rejected_tokens_gpu=num_rejected_tokens_gpu)
            hidden = self._forward(cad, num_tokens, cad.slot_mapping, first_pass=True)
            params = RowParams(sampling_metadata, batch, hidden.device)
            token_indices = token_indices[:batch].long()
            tokens = self._verify_pending(hidden, token_indices, next_token_ids, params, batch)
            if self._cos_discard is not None:  # partial prefill chunks emitted nothing after all
                discarded = int(self._cos_discard[:batch].bool().sum())
                core.stats.tokens_emitted -= discarded
                core.stats.row_steps -= discarded
            self._cos_sampled = self._cos_discard = None  # set again by the next step's bookkeeping
            changed = tokens != next_token_ids[:batch].long()

            # From here on: one token per row.
            positions = self.positions[token_indices].clone()
            cad.num_actual_tokens = batch
            cad.max_query_len = 1
            cad.query_start_loc = self.arange[: batch + 1]
            cad.query_start_loc_cpu = torch.from_numpy(self.token_arange_np[: batch + 1]).clone()
            if num_rejected_tokens_gpu is not None:
                cad.seq_lens -= num_rejected_tokens_gpu
            last_hidden = hidden[token_indices]
            if bool(changed.any()) and num_speculative_tokens > 0:
                # Re-feed the verified token at the same position (overwrites b's KV).
                cad.seq_lens -= 1
                cad.max_seq_len = max(cad.max_seq_len - 1, 1)
                last_hidden, positions = self._single_token_pass(cad, tokens, positions - 1, batch)

            gamma = num_speculative_tokens
            req_ids = list(self.cos_runner.input_batch.req_ids[:batch])
            if gamma == 0:
                for req_id in req_ids:
                    core.stash.pop(req_id, None)
                self._publish()
                return torch.empty(batch, 0, dtype=torch.int64, device=hidden.device)
            draft_ids, raws, qs = [], [], []
            for step in range(gamma):
                group_raw = self._raw_logits(last_hidden)  # [num_members, B, vocab]
                token, q = self._propose_from(group_raw[core.plan[step]], params, batch)
                draft_ids.append(token)
                raws.append(group_raw)
                qs.append(q)
                if step + 1 < gamma:
                    last_hidden, positions = self._single_token_pass(cad, token, positions, batch)
            drafts = torch.stack(draft_ids, dim=1)  # [B, gamma]
            raw_all = torch.stack(raws, dim=0).permute(2, 0, 1, 3)  # [B, gamma, num_members, vocab]
            q_all = torch.stack(qs, dim=1)  # [B, gamma, vocab]
            for i, req_id in enumerate(req_ids):
                core.stash[req_id] = DraftStash(drafts[i].tolist(), raw_all[i], q_all[i])
            self._prune_stash()
            self._publish()
            return drafts

        def _publish(self) -> None:
            if self.cos_core.metrics is not None:
                self.cos_core.metrics.publish(self.cos_core.stats)

        def _prune_stash(self) -> None:
            """Forget the drafts of finished requests (stopped, aborted, length)."""
            live = getattr(self.cos_runner, "requests", None)
            stash = self.cos_core.stash
            if live is not None and len(stash) > len(live):
                for req_id in [r for r in stash if r not in live]:
                    del stash[req_id]

    CoSProposer.__name__ = CoSProposer.__qualname__ = "CoSProposer"
    return CoSProposer


_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    import vllm.v1.worker.gpu_model_runner as runner_module

    stock = runner_module.DraftModelProposer
    runner_module.DraftModelProposer = make_proposer_class(stock)
    _installed = True


def worker_stats(worker) -> dict | None:
    """CoS counters of one worker (for ``LLM.collective_rpc``); None outside CoS schedules."""
    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    core = getattr(drafter, "cos_core", None)
    return None if core is None else core.stats.as_dict()
