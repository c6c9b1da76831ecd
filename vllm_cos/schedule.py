"""Schedules: which model runs next and how many tokens it proposes.

Standard collaborative decoding, naive CoS and the alternate proposal framework (APF) for
any number of models are the same algorithm with different schedules (DESIGN.md):

* ``standard``  - every model scores every position, nobody proposes (all gammas 0):
  n forwards per token, each token drawn from r.
* ``naive``     - one fixed proposer drafts gamma tokens; the others only score.
* ``alternate`` - round robin; every invocation scores what the others proposed, then
  proposes its own bonus token and gamma_i - 1 more drafts.

A rejection voids all pending tokens and the cycle restarts at the default proposer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    order: tuple[int, ...]  # invocation cycle, model indices
    gammas: tuple[int, ...]  # tokens each model proposes per invocation, by model index

    @property
    def num_models(self) -> int:
        return len(self.gammas)

    def next_position(self, position: int) -> int:
        return (position + 1) % len(self.order)

    @staticmethod
    def standard(num_models: int) -> "Schedule":
        return Schedule(order=tuple(range(num_models)), gammas=(0,) * num_models)

    @staticmethod
    def naive(num_models: int, proposer: int, gamma: int) -> "Schedule":
        others = tuple(k for k in range(num_models) if k != proposer)
        gammas = tuple(gamma if k == proposer else 0 for k in range(num_models))
        return Schedule(order=(proposer,) + others, gammas=gammas)

    @staticmethod
    def alternate(gammas: tuple[int, ...], first: int) -> "Schedule":
        n = len(gammas)
        return Schedule(order=tuple((first + i) % n for i in range(n)), gammas=tuple(gammas))


def schedule_from_config(config) -> Schedule:
    n = len(config.models)
    proposer = config.index(config.proposer)
    if config.schedule == "standard":
        return Schedule.standard(n)
    if config.schedule == "naive":
        return Schedule.naive(n, proposer, config.gammas[proposer])
    return Schedule.alternate(config.gammas, proposer)
