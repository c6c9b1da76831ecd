"""Lazy scoring (the paper's section 3.4): which draft-group members run each drafting pass.

A step's drafts are ``plan[0..k-1]``: draft j is drafted by group member ``plan[j]`` from its
logits at draft position j.  Position 0's logits come from the pass over the verified token
(every member runs it); position j >= 1's from the single-token pass over draft j - 1.

*Every pass* runs every member, so each draft position has every member's logits when the next
step verifies it.  *Lazily*, pass j - 1 runs only the members that still draft at position j or
later (they need their KV at draft j - 1 to go on); a member whose drafting is over scores the
rest of the drafts once, in the next step's first pass over the verify window, which runs every
member anyway.  The drafts from the first position that lacks a member's logits on are then
verified after that pass, together with the served model's proposal (``complete_drafts``
counts the ones before it).  With one member, or when the last member to draft is the same for
every position, nothing is skipped.

At the paper's three-model setting (plan [a, b], gamma 1 each) a step then runs served + a + b +
b instead of served + a + b + a + b: each model once per round, plus b's pass over a's draft.
"""

from __future__ import annotations

def last_drafts(plan: tuple[int, ...] | list[int], num_members: int) -> list[int]:
    """For each member, the last draft position it drafts (-1: none)."""
    last = [-1] * num_members
    for position, member in enumerate(plan):
        last[member] = position
    return last


def pass_members(plan, k: int, num_members: int, lazy: bool) -> list[tuple[int, ...]]:
    """For each single-token pass j = 0..k-2 (over draft j), the members that must run it."""
    everyone = tuple(range(num_members))
    if not lazy:
        return [everyone] * max(k - 1, 0)
    last = last_drafts(tuple(plan)[:k], num_members)
    return [tuple(m for m in everyone if last[m] > j) for j in range(k - 1)]


def complete_drafts(plan, k: int, num_members: int, lazy: bool) -> int:
    """How many leading draft positions of a k-draft step have every member's logits."""
    if k <= 0:
        return 0
    complete = 1  # position 0: the pass over the verified token runs every member
    for members in pass_members(plan, k, num_members, lazy):
        if len(members) < num_members:
            break
        complete += 1
    return complete


def member_passes_saved(plan, k: int, num_members: int, lazy: bool) -> int:
    """Member forwards a k-draft step skips (sum over passes of the members left out)."""
    return sum(num_members - len(m) for m in pass_members(plan, k, num_members, lazy))
