"""Hook: every request control of vLLM's sampler, applied to the combined distribution r.

Under ``standard`` the stock Sampler processes log r itself (the wrapper model's logits *are*
log r).  Under ``naive`` / ``alternate`` our samplers build log r at each verified position,
so they call :meth:`Controls.apply` on it, in the stock Sampler's order:

1. the structured-output bitmask (the runner's, handed over by the grammar hook in
   :mod:`vllm_cos.adapters.spec_decode`),
2. ``allowed_token_ids``,
3. ``bad_words`` (given the tokens before the position),
4. ``min_tokens`` (stop tokens masked while the position is before ``min_tokens``) and
   ``logit_bias``,
5. repetition / frequency / presence penalties (given the tokens before the position),

then :class:`RowSampling` applies temperature, ``min_p``, top-k and top-p
(:func:`vllm_cos.sampling.apply_sampling_params`).  The same :meth:`Controls.apply` shapes the
served model's own proposal distribution, so its proposals obey the grammar too.

A *row* is one (request, position) pair: position p of request i is where i's output plus
the first p of its scheduled drafts have been emitted (vLLM evaluates its own drafts the same
way).  Custom logits processors and thinking budgets cannot be evaluated at draft positions;
they are refused before a request starts (:mod:`vllm_cos.adapters.request_checks`).

vLLM internals touched: ``SamplingMetadata`` fields (``allowed_token_ids_mask``,
``bad_words_token_ids``, ``output_token_ids``, ``spec_token_ids``, ``no_penalties``,
``prompt_token_ids``, ``*_penalties``, ``logitsprocs``, ``temperature``, ``top_k``, ``top_p``,
``generators``, ``thinking_budget_state_holder``); the builtin processors' state
(``MinTokensLogitsProcessor.min_toks``, ``LogitBiasLogitsProcessor.biases``,
``MinPLogitsProcessor.min_p_cpu_tensor`` / ``min_p_count``); ``apply_bad_words``,
``apply_all_penalties``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_cos.coupling import race, race_noise
from vllm_cos.sampling import apply_sampling_params, sample_from_probs

NEG_INF = float("-inf")


@dataclass
class RowLayout:
    """Which (request, position) each of N rows is."""

    request: torch.Tensor  # [N] int64 batch index
    position: torch.Tensor  # [N] int64 drafts emitted before the row

    @classmethod
    def grid(cls, batch: int, width: int, device) -> "RowLayout":
        """Rows (i, 0..width-1) for every request i, request-major."""
        return cls(torch.arange(batch, device=device).repeat_interleave(width),
                   torch.arange(width, device=device).repeat(batch))

    @classmethod
    def at(cls, position: torch.Tensor) -> "RowLayout":
        """One row per request at ``position[i]``."""
        return cls(torch.arange(position.shape[0], device=position.device), position.long())


def _processors(sampling_metadata):
    """(min_tokens, logit_bias, min_p, others) among the batch's logits processors."""
    from vllm.v1.sample.logits_processor.builtin import (
        LogitBiasLogitsProcessor, MinPLogitsProcessor, MinTokensLogitsProcessor)

    found = {"min_tokens": None, "logit_bias": None, "min_p": None, "other": []}
    procs = getattr(sampling_metadata, "logitsprocs", None)
    for proc in list(getattr(procs, "non_argmax_invariant", ())) + list(getattr(procs, "argmax_invariant", ())):
        if isinstance(proc, MinTokensLogitsProcessor):
            found["min_tokens"] = proc
        elif isinstance(proc, LogitBiasLogitsProcessor):
            found["logit_bias"] = proc
        elif isinstance(proc, MinPLogitsProcessor):
            found["min_p"] = proc
        else:
            found["other"].append(type(proc).__name__)
    return found


class Controls:
    """The request controls of one batch (B requests, vocabulary V), ready to apply to rows."""

    def __init__(self, sampling_metadata, batch: int, vocab: int, device, overrides=None):
        self.sm = sampling_metadata
        self.overrides = overrides  # BatchOverrides | None: the requests' own rule parameters
        self.batch, self.vocab, self.device = batch, vocab, device
        procs = _processors(sampling_metadata)
        if procs["other"]:
            raise RuntimeError(f"cos: logits processors {procs['other']} cannot be applied to r at "
                               f"draft positions (they were to be refused at start-up)")
        holder = getattr(sampling_metadata, "thinking_budget_state_holder", None)
        if holder is not None and holder.has_tracked_requests():
            raise RuntimeError("cos: thinking_token_budget reached a CoS speculative step "
                               "(it was to be refused per request)")
        self.min_tokens = self._min_tokens_state(procs["min_tokens"])
        self.logit_bias = self._logit_bias_state(procs["logit_bias"])
        self.min_p = self._min_p_state(procs["min_p"])
        self.uses_history = bool(getattr(sampling_metadata, "bad_words_token_ids", None)) or not getattr(
            sampling_metadata, "no_penalties", True)

    # ------------------------------------------------------------------ per-batch state
    def _min_tokens_state(self, proc):
        """(remaining [B], stop_mask [B, V], structured [B]) or None."""
        entries = getattr(proc, "min_toks", None)
        if not entries:
            return None
        remaining = torch.zeros(self.batch, dtype=torch.long)
        stop_mask = torch.zeros(self.batch, self.vocab, dtype=torch.bool)
        structured = torch.zeros(self.batch, dtype=torch.bool)
        for index, (min_tok, output_ids, stop_ids, uses_structured) in entries.items():
            if index >= self.batch:
                continue
            remaining[index] = min_tok - len(output_ids)
            ids = [t for t in stop_ids if t < self.vocab]
            stop_mask[index, ids] = True
            structured[index] = bool(uses_structured)
        return remaining.to(self.device), stop_mask.to(self.device), structured.to(self.device)

    def _logit_bias_state(self, proc):
        """Dense bias [B, V] or None."""
        if proc is None or not proc.biases:
            return None
        bias = torch.zeros(self.batch, self.vocab, device=self.device)
        for index, token_bias in proc.biases.items():
            for token, value in token_bias.items():
                if index < self.batch and token < self.vocab:
                    bias[index, token] += value
        return bias

    def _min_p_state(self, proc):
        if proc is None or not proc.min_p_count:
            return None
        return proc.min_p_cpu_tensor[: self.batch].to(self.device, torch.float32)

    # ------------------------------------------------------------------ rows
    def rule_params(self, layout: RowLayout) -> dict | None:
        """The combination rule's parameters of each row's request (None: the configuration's)."""
        return None if self.overrides is None else self.overrides.rows(layout.request)

    def history(self, layout: RowLayout) -> list[list[int]]:
        """The tokens before each row: output plus the scheduled drafts before its position."""
        outputs = self.sm.output_token_ids
        drafts = getattr(self.sm, "spec_token_ids", None) or [[] for _ in range(self.batch)]
        return [list(outputs[i]) + list(drafts[i][:p])
                for i, p in zip(layout.request.tolist(), layout.position.tolist())]

    def apply(self, logits: torch.Tensor, layout: RowLayout, grammar: torch.Tensor | None) -> torch.Tensor:
        """Every control on ``logits`` [N, V] (a new tensor); ``grammar`` [N, V] additive or None."""
        sm, request = self.sm, layout.request
        logits = logits.float().clone()
        if grammar is not None:
            logits += grammar
        if sm.allowed_token_ids_mask is not None:
            logits.masked_fill_(sm.allowed_token_ids_mask[request, : self.vocab], NEG_INF)
        history = self.history(layout) if self.uses_history else None
        if sm.bad_words_token_ids:
            from vllm.v1.sample.ops.bad_words import apply_bad_words

            rows = {n: sm.bad_words_token_ids[i] for n, i in enumerate(request.tolist())
                    if i in sm.bad_words_token_ids}
            apply_bad_words(logits, rows, history)
        if self.min_tokens is not None:
            logits = self._mask_stop_tokens(logits, layout)
        if self.logit_bias is not None:
            logits += self.logit_bias[request]
        if not sm.no_penalties:
            from vllm.v1.sample.ops.penalties import apply_all_penalties

            logits = apply_all_penalties(logits, sm.prompt_token_ids[request], sm.presence_penalties[request],
                                         sm.frequency_penalties[request], sm.repetition_penalties[request],
                                         history)
        return logits

    def _mask_stop_tokens(self, logits: torch.Tensor, layout: RowLayout) -> torch.Tensor:
        """min_tokens: stop tokens are -inf while the row is before the request's min_tokens;
        a structured-output row left with no token at all keeps its stop tokens (as stock)."""
        remaining, stop_mask, structured = self.min_tokens
        active = (layout.position < remaining[layout.request]).unsqueeze(-1)  # [N, 1]
        mask = stop_mask[layout.request] & active  # [N, V]
        masked = logits.masked_fill(mask, NEG_INF)
        empty = torch.isneginf(masked).all(dim=-1, keepdim=True) & structured[layout.request].unsqueeze(-1)
        return torch.where(empty, logits, masked)


class RowSampling:
    """Per-row temperature / top-k / top-p / min_p for rows of a batch of B requests.

    Seeded requests draw by position-keyed races (:mod:`vllm_cos.coupling`): ``seeds`` [B]
    (a seeded request's generator's seed), ``seeded`` [B] and ``emitted`` [B] (output tokens of
    each request before this step; a row at window offset j is output position emitted + j).
    """

    def __init__(self, sampling_metadata, batch: int, device, min_p: torch.Tensor | None = None,
                 emitted: list[int] | None = None):
        sm = sampling_metadata
        self.temperature = (torch.zeros(batch, device=device) if sm.temperature is None
                            else sm.temperature[:batch].float())
        self.top_k = None if sm.top_k is None else sm.top_k[:batch]
        self.top_p = None if sm.top_p is None else sm.top_p[:batch]
        self.min_p = min_p
        # True: every row greedy, False: none (vLLM's flags for the batch), None: mixed
        self.all_greedy = True if sm.all_greedy else False if sm.all_random else None
        gens = sm.generators or {}
        generators = [gens.get(i) for i in range(batch)]
        self.seeded = self.seeds = self.emitted = None
        if any(g is not None for g in generators):
            if emitted is None:
                raise ValueError("cos: seeded rows need each request's emitted-token count")
            self.seeded = torch.tensor([g is not None for g in generators], device=device)
            self.seeds = torch.tensor([0 if g is None else g.initial_seed() for g in generators],
                                      dtype=torch.int64, device=device)
            self.emitted = torch.tensor(emitted[:batch], dtype=torch.int64, device=device)

    def noise(self, offset: torch.Tensor, vocab: int, request: torch.Tensor | None = None) -> torch.Tensor:
        """Race noise [N, V] of rows (request[n], output position emitted[request[n]] + offset[n]);
        ``request`` None: one row per request (N = B)."""
        seeds, emitted = (self.seeds, self.emitted) if request is None else (self.seeds[request], self.emitted[request])
        return race_noise(seeds, emitted + offset.to(emitted.device), vocab)

    def probs(self, logits: torch.Tensor, layout: RowLayout | None = None) -> torch.Tensor:
        """The distribution [N, V] of processed ``logits`` rows (one per request if no layout)."""
        def rows(t):
            return None if t is None or layout is None else t[layout.request]
        if layout is None:
            return apply_sampling_params(logits, self.temperature, self.top_k, self.top_p, self.min_p,
                                         self.all_greedy)
        return apply_sampling_params(logits, rows(self.temperature), rows(self.top_k), rows(self.top_p),
                                     rows(self.min_p), self.all_greedy)

    def sample(self, probs: torch.Tensor, offset: torch.Tensor, one_hot_if_greedy: bool = True) -> torch.Tensor:
        """One token per request row of ``probs`` [B, V], the row of request i at output position
        emitted[i] + ``offset[i]`` (a seeded row races there; see :mod:`vllm_cos.coupling`).  In an
        all-greedy batch, rows from :meth:`probs` are one-hot: the token is their argmax, seeded
        or not (``one_hot_if_greedy`` False: ``probs`` came from elsewhere, sample them)."""
        if self.all_greedy and one_hot_if_greedy:
            return probs.argmax(dim=-1)
        token = sample_from_probs(probs, torch.rand(probs.shape[0], dtype=torch.float64, device=probs.device))
        if self.seeded is None:
            return token
        return torch.where(self.seeded, race(probs, self.noise(offset, probs.shape[-1])), token)
