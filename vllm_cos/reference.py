"""Reference implementation on plain PyTorch / transformers causal LMs with KV caches.

It runs standard collaborative decoding and CoS under every schedule for a batch of
prompts, and is the oracle of the engine tests and the "plain Python loop" baseline of
the benchmarks.  Each request owns a :class:`~vllm_cos.ledger.Ledger`, a KV cache per model
and a position in the schedule's cycle; the requests advance in lockstep ticks, and each
tick verifies every request at once with the batched :func:`~vllm_cos.verify.verify`.

One tick of one request invokes model k = order[cursor]:
  1. k scores every token it has not seen yet (one forward), which fills its column of
     the ledger up to the frontier;
  2. the complete leading entries are verified against r (a complete frontier is sampled
     from r directly); a rejection voids the ledger and rewinds every cache;
  3. unless it rejected, k proposes gamma_k tokens from its own distribution q (the first
     one is the "bonus" of an alternate verifier), one forward per further token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from vllm_cos.combine import build_combiner
from vllm_cos.config import CoSConfig
from vllm_cos.ledger import Ledger
from vllm_cos.sampling import apply_sampling_params, draw_uniforms, sample_from_probs
from vllm_cos.schedule import Schedule, schedule_from_config
from vllm_cos.verify import verify


@dataclass(frozen=True)
class SamplingSpec:
    max_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class DecodeStats:
    forwards: list[int]  # per model: forward passes
    proposed: int = 0  # tokens proposed (drafts and bonus tokens)
    verified: int = 0  # proposed tokens that reached verification
    accepted: int = 0
    emitted: int = 0
    verify_rounds: int = 0  # verifications that emitted at least one token
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.verified if self.verified else float("nan")

    def merge(self, other: "DecodeStats") -> None:
        self.forwards = [a + b for a, b in zip(self.forwards, other.forwards)]
        for name in ("proposed", "verified", "accepted", "emitted", "verify_rounds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class ReferenceOutput:
    token_ids: list[int]
    stats: DecodeStats


class CausalLM:
    """A transformers causal LM with one KV cache per request (``extend`` / ``rewind``)."""

    def __init__(self, model):
        self.model = model.eval()

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "auto") -> "CausalLM":
        from transformers import AutoModelForCausalLM

        torch_dtype = torch.float32 if dtype in ("auto", "float32") else getattr(torch, dtype)
        return cls(AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype))

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()

    @torch.inference_mode()
    def extend(self, cache, token_ids: Sequence[int]) -> torch.Tensor:  # [len(token_ids), vocab]
        input_ids = torch.tensor([list(token_ids)], dtype=torch.long)
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        return out.logits[0].float()

    def rewind(self, cache, length: int) -> None:
        excess = cache.get_seq_length() - length
        if excess > 0:
            cache.crop(-excess)


@dataclass
class _Request:
    index: int
    prompt: list[int]
    spec: SamplingSpec
    generator: torch.Generator | None
    ledger: Ledger
    caches: list
    seen: list[int]  # per model: tokens in its cache
    output: list[int] = field(default_factory=list)
    cursor: int = 0
    done: bool = False

    @property
    def context(self) -> list[int]:
        return self.prompt + self.output


class ReferenceDecoder:
    def __init__(self, config: CoSConfig, models: Sequence[CausalLM] | None = None,
                 schedule: Schedule | None = None):
        self.config = config
        self.models = list(models) if models is not None else [
            CausalLM.from_pretrained(m.path, m.dtype) for m in config.models]
        self.schedule = schedule or schedule_from_config(config)
        self.combiner = build_combiner(config.rule, config.model_names)
        self.vocab_size = min(m.vocab_size for m in self.models)

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: Sequence[Sequence[int]], specs: SamplingSpec | Sequence[SamplingSpec],
                 eos_token_id: int | None = None) -> list[ReferenceOutput]:
        if isinstance(specs, SamplingSpec):
            specs = [specs] * len(prompts)
        n = len(self.models)
        requests = []
        for i, (prompt, spec) in enumerate(zip(prompts, specs)):
            gen = None
            if spec.seed is not None:
                gen = torch.Generator().manual_seed(spec.seed)
            requests.append(_Request(i, list(prompt), spec, gen, Ledger(n),
                                     [m.new_cache() for m in self.models], [0] * n))
        stats = [DecodeStats(forwards=[0] * n) for _ in requests]
        start = time.perf_counter()
        active = [r for r in requests if r.spec.max_tokens > 0]
        while active:
            models = [self.schedule.order[r.cursor] for r in active]
            for r, k in zip(active, models):
                self._score(r, k, stats[r.index])
            rejected = self._verify(active, stats, eos_token_id)
            proposers = []
            for r, k, rej in zip(active, models, rejected):
                if r.done:
                    continue
                if rej:
                    r.cursor = 0
                    continue
                proposers.append((r, k))
                r.cursor = self.schedule.next_position(r.cursor)
            self._propose(proposers, stats)
            active = [r for r in active if not r.done]
        elapsed = time.perf_counter() - start
        for s in stats:
            s.seconds = elapsed
        return [ReferenceOutput(r.output, s) for r, s in zip(requests, stats)]

    # ------------------------------------------------------------------ steps
    def _forward(self, r: _Request, k: int, token_ids: list[int], stats: DecodeStats) -> torch.Tensor:
        logits = self.models[k].extend(r.caches[k], token_ids)[:, : self.vocab_size]
        r.seen[k] += len(token_ids)
        stats.forwards[k] += 1
        return logits

    def _score(self, r: _Request, k: int, stats: DecodeStats) -> None:
        """Model k reads every token it has not seen; attach its scores from the emitted end on."""
        sequence = r.context + r.ledger.pending_tokens()
        unseen = sequence[r.seen[k]:]
        if not unseen:
            return
        first_position = r.seen[k] + 1  # position scored by the first new row
        logits = self._forward(r, k, unseen, stats)  # [len(unseen), vocab]
        base = len(r.context)
        skip = max(0, base - first_position)
        r.ledger.add_scores(k, first_position + skip - base, logits[skip:])

    def _verify(self, active: list[_Request], stats: list[DecodeStats], eos_token_id) -> list[bool]:
        ready = [r.ledger.ready() for r in active]
        rows = [i for i, (count, final) in enumerate(ready) if count > 0 or final]
        rejected = [False] * len(active)
        if not rows:
            return rejected
        max_drafts = max(ready[i][0] for i in rows)
        n, vocab = len(self.models), self.vocab_size
        member_logits, proposal_rows, params = [], [], []
        for i in rows:
            count, final = ready[i]
            entries = active[i].ledger.entries[: count + int(final)]
            entries += [entries[-1]] * (max_drafts + 1 - len(entries))  # padding rows
            member_logits.append(torch.stack([torch.stack(e.member_logits) for e in entries], dim=1))
            q = [e.proposal_probs for e in entries[:count]]
            q += [torch.zeros(vocab)] * (max_drafts - count)
            proposal_rows.append(torch.stack(q) if q else torch.zeros(0, vocab))
            params.append(active[i].spec)
        # [n, rows * (max_drafts + 1), vocab] -> combined -> tempered r
        combined_logits = self.combiner(torch.cat(member_logits, dim=1))
        per_row = max_drafts + 1
        target_probs = _tempered(combined_logits, params, per_row).view(len(rows), per_row, vocab)
        draft_ids = torch.tensor(
            [[e.token for e in active[i].ledger.entries[: ready[i][0]]] + [0] * (max_drafts - ready[i][0])
             for i in rows], dtype=torch.long).view(len(rows), max_drafts)
        result = verify(
            draft_token_ids=draft_ids,
            num_drafts=torch.tensor([ready[i][0] for i in rows]),
            proposal_probs=torch.stack(proposal_rows),
            target_probs=target_probs,
            has_final=torch.tensor([ready[i][1] for i in rows]),
            generators=[active[i].generator for i in rows],
        )
        for row, i in enumerate(rows):
            r, s = active[i], stats[active[i].index]
            emitted = result.token_ids[row, : int(result.num_emitted[row])].tolist()
            accepted = int(result.num_accepted[row])
            s.verified += accepted + int(bool(result.rejected[row]))
            s.accepted += accepted
            s.verify_rounds += 1
            if bool(result.rejected[row]):
                rejected[i] = True
                r.ledger.clear()
                valid = len(r.context) + accepted
                for k, model in enumerate(self.models):
                    if r.seen[k] > valid:
                        model.rewind(r.caches[k], valid)
                        r.seen[k] = valid
            else:
                r.ledger.consume(len(emitted))
            self._emit(r, emitted, s, eos_token_id)
        return rejected

    def _emit(self, r: _Request, tokens: list[int], stats: DecodeStats, eos_token_id) -> None:
        for token in tokens:
            r.output.append(token)
            stats.emitted += 1
            if token == eos_token_id or len(r.output) >= r.spec.max_tokens:
                r.done = True
                return

    def _propose(self, proposers: list[tuple[_Request, int]], stats: list[DecodeStats]) -> None:
        """Each (request, model) proposes gamma_model tokens; rows advance in lockstep."""
        budgets = [min(self.schedule.gammas[k], r.spec.max_tokens - len(r.output) - r.ledger.num_proposed)
                   for r, k in proposers]
        for step in range(max(budgets, default=0)):
            rows = [(r, k) for (r, k), budget in zip(proposers, budgets) if step < budget]
            for r, k in rows:
                if not r.ledger.has_scored_frontier(k):
                    sequence = r.context + r.ledger.pending_tokens()
                    logits = self._forward(r, k, sequence[r.seen[k]:], stats[r.index])
                    r.ledger.add_scores(k, r.ledger.num_proposed, logits[-1:])
            raw_logits = torch.stack([r.ledger.frontier_logits(k) for r, k in rows])  # [rows, vocab]
            proposal_probs = self._proposal_probs(raw_logits, [r.spec for r, _ in rows])
            uniforms = torch.cat(draw_uniforms([1] * len(rows), [r.generator for r, _ in rows]))
            tokens = sample_from_probs(proposal_probs, uniforms).tolist()
            for (r, k), token, q in zip(rows, tokens, proposal_probs):
                r.ledger.propose(k, token, q)
                stats[r.index].proposed += 1

    def _proposal_probs(self, raw_logits: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
        if self.config.proposal == "raw":
            return torch.softmax(raw_logits, dim=-1)
        return _tempered(raw_logits, specs)


def _tempered(logits: torch.Tensor, specs: list[SamplingSpec], rows_per_spec: int = 1) -> torch.Tensor:
    """apply_sampling_params with each request's parameters repeated over its rows."""
    def column(values):
        return torch.tensor(values).repeat_interleave(rows_per_spec)
    return apply_sampling_params(logits, column([s.temperature for s in specs]),
                                 column([s.top_k for s in specs]), column([s.top_p for s in specs]))


def generate(config: CoSConfig, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             eos_token_id: int | None = None, decoder: ReferenceDecoder | None = None) -> list[list[int]]:
    """Generated token ids per prompt (request i uses seed + i when a seed is given)."""
    decoder = decoder or ReferenceDecoder(config)
    specs = [SamplingSpec(max_tokens, temperature, top_k, top_p, None if seed is None else seed + i)
             for i in range(len(prompts))]
    return [o.token_ids for o in decoder.generate(prompts, specs, eos_token_id)]
