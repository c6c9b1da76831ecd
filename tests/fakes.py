"""Small deterministic language models for fast tests of the reference decoder."""

from __future__ import annotations

import torch


class PrefixLM:
    """The interface the reference decoder needs (new_cache / extend / rewind / vocab_size)
    for a model whose logits are a function of the token prefix: the "cache" is the token
    list itself.  Subclasses define :meth:`logits_after`."""

    vocab_size: int

    def logits_after(self, tokens) -> torch.Tensor:  # [vocab]
        raise NotImplementedError

    def new_cache(self) -> list[int]:
        return []

    def extend(self, cache: list[int], token_ids) -> torch.Tensor:  # [len(token_ids), vocab]
        rows = []
        for token in token_ids:
            cache.append(int(token))
            rows.append(self.logits_after(cache))
        return torch.stack(rows)

    def rewind(self, cache: list[int], length: int) -> None:
        del cache[length:]


class TableLM(PrefixLM):
    """Next-token logits depend on the last two tokens through a fixed random table."""

    def __init__(self, vocab_size: int, seed: int, scale: float = 2.0):
        gen = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self.table = torch.randn(vocab_size, vocab_size, vocab_size, generator=gen) * scale  # [prev, last, vocab]

    def logits_after(self, tokens) -> torch.Tensor:  # [vocab]
        prev = tokens[-2] if len(tokens) >= 2 else 0
        return self.table[prev, tokens[-1]]


class MemoizedLM(PrefixLM):
    """Wraps a transformers-backed ``CausalLM``: logits per token prefix are computed once.

    Sampling tests draw 100k short continuations of one prompt; the distinct prefixes are
    few, so each is forwarded once (without KV cache) and then served from a dict.
    """

    def __init__(self, lm):
        self.lm = lm
        self.vocab_size = lm.vocab_size
        self._memo: dict[tuple[int, ...], torch.Tensor] = {}

    def logits_after(self, tokens) -> torch.Tensor:  # [vocab]
        key = tuple(tokens)
        if key not in self._memo:
            logits = self.lm.extend(self.lm.new_cache(), list(key))  # [len, vocab]
            for end in range(1, len(key) + 1):
                self._memo.setdefault(key[:end], logits[end - 1])
        return self._memo[key]
