"""The CoS configuration bound to one worker: roles, rule, counters, the step channel.

Counters are device tensors added to without host syncs; :meth:`CoSStats.as_dict` reads them
(once per step, when metrics are published, and on ``cos_stats``).
"""

from __future__ import annotations

import torch

from vllm_cos.adaptive import DraftLengthController
from vllm_cos.combine import build_combiner
from vllm_cos.engine import draft_plan
from vllm_cos.lazy import complete_drafts, member_passes_saved, pass_members
from vllm_cos.overrides import BatchOverrides
from vllm_cos.adapters.fusion import FusedGroup
from vllm_cos.adapters.prompt_logprobs import PromptScores
from vllm_cos.adapters.step import GrammarHandoff, StepChannel

COUNTERS = ("steps", "draft_forwards", "drafts_proposed", "drafts_accepted", "draft_rejections",
            "served_proposed", "served_accepted", "tokens_emitted", "row_steps", "fused_steps",
            "drafted_rows", "voided_rows", "member_passes_skipped")


class CoSStats:
    """CoS counters of one worker.

    steps: engine steps with CoS sampling (= served-model forwards); draft_forwards: draft-group
    passes; drafts_proposed / drafts_accepted: the group's drafts verified against r;
    draft_rejections: rows whose drafts met a rejection (the drafts after it were never tried);
    served_proposed / served_accepted: the served model's proposals verified by the group;
    tokens_emitted; row_steps: (request, step) pairs = verification rounds; fused_steps: steps whose
    group ran inside the served model's forward (:mod:`vllm_cos.adapters.fusion`); drafted_rows /
    voided_rows: rows that drafted, and of those the rows whose drafts were voided (drafted after
    a proposal the group changed); member_passes_skipped: draft-group member forwards left out by
    lazy scoring (:mod:`vllm_cos.lazy`).
    """

    def __init__(self, **initial: int):
        self._counts = torch.zeros(len(COUNTERS), dtype=torch.long)  # tensor increments
        self._host = dict.fromkeys(COUNTERS, 0)  # plain-int increments (no tensor op per add)
        self._host.update(initial)

    def add(self, name: str, value) -> None:
        """Add an int or a 0-d tensor (on any device) without reading it back."""
        if isinstance(value, torch.Tensor):
            self._counts[COUNTERS.index(name)] += value.to(self._counts.device, torch.long)
        else:
            self._host[name] += value

    def __getattr__(self, name: str) -> int:
        if name in COUNTERS:
            return int(self._counts[COUNTERS.index(name)]) + self._host[name]
        raise AttributeError(name)

    def as_dict(self) -> dict:
        c = {k: v + self._host[k] for k, v in zip(COUNTERS, self._counts.tolist())}
        proposed = c["drafts_proposed"] + c["served_proposed"]
        accepted = c["drafts_accepted"] + c["served_accepted"]
        c["acceptance_rate"] = accepted / proposed if proposed else 0.0
        c["mean_tokens_per_step"] = c["tokens_emitted"] / c["steps"] if c["steps"] else 0.0
        c["mean_accepted_length"] = c["tokens_emitted"] / c["row_steps"] if c["row_steps"] else 0.0
        return c


class CoSCore:
    """``group`` = config indices of the draft group's members (every model but the served
    one, in config order); ``plan`` = for each draft token of a step, the position in
    ``group`` of the member that drafts it (:func:`vllm_cos.engine.draft_plan`)."""

    def __init__(self, cfg, tokenizer_size: int):
        self.cfg = cfg
        self.tokenizer_size = tokenizer_size
        self.target_index = cfg.index(cfg.target)
        self.group = [i for i in range(len(cfg.models)) if i != self.target_index]
        self.plan = [self.group.index(i) for i in draft_plan(cfg)]
        self.group_label = "+".join(cfg.models[i].name for i in self.group)
        self.combiner = build_combiner(cfg.rule, cfg.model_names)
        self.schedule = cfg.schedule
        self.lazy = cfg.scoring == "lazy"
        self.proposal_mode = cfg.proposal
        self.steps = StepChannel()
        self.grammar = GrammarHandoff()
        self.fusion = FusedGroup()  # gamma: auto -- verify-only steps fused into the served forward
        self.prompt_scores = PromptScores()  # the group's logits at prompt tokens, for prompt logprobs of r
        self.stash = None  # DraftStash, allocated by the proposer at model load
        self.stats = CoSStats()
        self.draft_length = (DraftLengthController(len(self.plan)) if cfg.draft_length == "auto" and self.plan
                             else None)  # gamma: auto
        self.logprobs_mode = "raw_logprobs"
        self.metrics = None  # CoSMetrics, set in the worker
        self.reporting = True  # publishes metrics and answers cos_stats (tensor-parallel rank 0)

    def combine(self, target_logits: torch.Tensor, group_logits: torch.Tensor,
                row_params: dict | None = None) -> torch.Tensor:
        """log r [N, V] from T's raw logits [N, V] and the group's [num_members, N, V];
        ``row_params``: the rows' own rule parameters (requests' settings, vllm_cos.overrides)."""
        members = [None] * (len(self.group) + 1)
        members[self.target_index] = target_logits.float()
        for position, index in enumerate(self.group):
            members[index] = group_logits[position].float()
        return self.combiner(torch.stack(members), **(row_params or {}))

    def pass_members(self, k: int) -> list[tuple[int, ...] | None]:
        """For each single-token pass of a k-draft step, the group members it runs (None: all)."""
        everyone = len(self.group)
        return [None if len(m) == everyone else m for m in pass_members(self.plan, k, everyone, self.lazy)]

    def complete_drafts(self, k: int) -> int:
        """Leading drafts of a k-draft step that every member scores in the step (the rest: lazily)."""
        return complete_drafts(self.plan, k, len(self.group), self.lazy)

    def member_passes_saved(self, k: int) -> int:
        return member_passes_saved(self.plan, k, len(self.group), self.lazy)

    def request_overrides(self, runner, req_ids, device):
        """The batch's per-request collaboration settings (None: no request sets any)."""
        return BatchOverrides.of_requests(getattr(runner, "requests", None) or {}, req_ids, self.cfg, device)

    def crop(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., : self.tokenizer_size].float()

    def proposal_probs(self, drafter_logits: torch.Tensor, sampling) -> torch.Tensor:
        """q [B, V] a drafter samples from, given its raw logits [B, V] (one row per request)."""
        if self.proposal_mode == "raw":
            return torch.softmax(drafter_logits.float(), dim=-1)
        return sampling.probs(drafter_logits)

    def draft_proposals(self, member_logits: torch.Tensor, sampling) -> torch.Tensor:
        """q [B, K, V] of the K stashed drafts from the group's logits [B, K, M, V]."""
        qs = [self.proposal_probs(member_logits[:, j, self.plan[j]], sampling)
              for j in range(member_logits.shape[1])]
        return torch.stack(qs, dim=1)

    def logprob_rows(self, log_r: torch.Tensor, r: torch.Tensor, tokens: torch.Tensor, num_logprobs: int):
        """vLLM ``LogprobsTensors`` of r at N positions for the emitted ``tokens`` [N].

        As the stock path for the served model, per ``logprobs_mode``: ``raw_logprobs``
        (default) = log r before the request's controls and sampling parameters (what the
        ``standard`` schedule reports), ``raw_logits`` = the rule's combined logits,
        ``processed_*`` = log of r after them.
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
