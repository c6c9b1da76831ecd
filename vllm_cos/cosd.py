"""CoSD ("Speculate, then Collaborate", ICML 2025) as a CoS rule; pure torch, no vLLM.

CoSD: a draft model proposes a run of tokens, an assistant model scores them in one forward,
and a verifier decides per position whether to keep the draft token x = argmax p_draft or to
replace it by the assistant's top token y = argmax p_assist; drafting restarts after the first
replacement.  The token CoSD emits at a position is therefore a deterministic function
``choice(p_draft, p_assist)`` of the two models' next-token distributions there, so CoSD is a
*rule* whose r is one-hot on that choice: under CoS's speculative verification a draft is
accepted iff r(x) > 0 and the recovered token is the choice, so every CoS schedule emits
exactly CoSD's tokens (:func:`cosd_log_r` returns log r: 0 at the choice, -inf elsewhere).

Verifiers (both batched over rows; each only acts where x != y):

* :class:`RuleVerifier` -- the paper's rule as we read it: pick y when p_draft(x) < alpha and
  p_assist(y) > beta * p_draft(x).
* :class:`TreeVerifier` -- a small decision tree over :data:`FEATURES` stored as plain JSON
  (``{"nodes": [{"feature": i, "threshold": t, "left": j, "right": k}, {"leaf": 1}, ...]}``,
  node 0 the root, ``feature <= threshold`` goes left, leaf 1 = pick y), evaluated in torch by
  walking the tree's depth with gathers.

:func:`reference_decode` is the plain-Python CoSD loop (draft gamma greedily, one assistant
forward, verify per position, restart after the first replacement): the oracle of the tests.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

FEATURES = ("p_draft(x)", "p_assist(y)", "p_assist(x)", "p_draft(y)")
DEFAULT_ALPHA = 0.5
DEFAULT_BETA = 0.5
TREE_FORMAT = "cosd-tree/1"
MAX_TREE_DEPTH = 16
_TREE_KEYS = {"nodes", "features", "format", "meta"}
_INFO_KEYS = {"samples", "y_rate"}  # informational (training counts), ignored by the walk


class TreeError(ValueError):
    """An invalid tree JSON; the message names the file (when known) and the problem."""


# ---------------------------------------------------------------------------- features

def candidates(draft_logits: torch.Tensor,  # [N, V] raw logits of the draft model
               assist_logits: torch.Tensor,  # [N, V] raw logits of the assistant
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x = argmax p_draft, y = argmax p_assist ([N] int64) and the features [N, 4] float32
    in the order of :data:`FEATURES` (p at temperature 1)."""
    p_draft = torch.softmax(draft_logits.float(), dim=-1)
    p_assist = torch.softmax(assist_logits.float(), dim=-1)
    x = p_draft.argmax(dim=-1)
    y = p_assist.argmax(dim=-1)
    xs, ys = x.unsqueeze(-1), y.unsqueeze(-1)
    feats = torch.cat([p_draft.gather(-1, xs), p_assist.gather(-1, ys),
                       p_assist.gather(-1, xs), p_draft.gather(-1, ys)], dim=-1)
    return x, y, feats


@dataclass(frozen=True)
class RuleVerifier:
    """Pick y when p_draft(x) < alpha and p_assist(y) > beta * p_draft(x)."""

    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA

    def picks_assistant(self, feats: torch.Tensor) -> torch.Tensor:  # [N, 4] -> bool [N]
        p_draft_x, p_assist_y = feats[:, 0], feats[:, 1]
        return (p_draft_x < self.alpha) & (p_assist_y > self.beta * p_draft_x)


@dataclass(frozen=True)
class Tree:
    """Flat arrays of a decision tree; a leaf points to itself, so a walk of ``depth`` steps
    ends on every row's leaf."""

    feature: tuple[int, ...]  # per node; 0 for leaves (unused)
    threshold: tuple[float, ...]  # per node; go left when the feature is <= threshold
    left: tuple[int, ...]
    right: tuple[int, ...]
    value: tuple[int, ...]  # leaves: 1 = pick y; internal nodes: 0 (unused)
    depth: int

    def predict(self, feats: torch.Tensor) -> torch.Tensor:  # [N, 4] float -> bool [N]
        device = feats.device
        feature = torch.tensor(self.feature, dtype=torch.long, device=device)
        threshold = torch.tensor(self.threshold, dtype=torch.float64, device=device)
        left = torch.tensor(self.left, dtype=torch.long, device=device)
        right = torch.tensor(self.right, dtype=torch.long, device=device)
        node = torch.zeros(feats.shape[0], dtype=torch.long, device=device)
        values = feats.double()
        for _ in range(self.depth):
            v = values.gather(1, feature[node].unsqueeze(1)).squeeze(1)
            node = torch.where(v <= threshold[node], left[node], right[node])
        return torch.tensor(self.value, dtype=torch.bool, device=device)[node]


@dataclass(frozen=True)
class TreeVerifier:
    tree: Tree

    def picks_assistant(self, feats: torch.Tensor) -> torch.Tensor:
        return self.tree.predict(feats)


Verifier = RuleVerifier | TreeVerifier


def choose(draft_logits: torch.Tensor, assist_logits: torch.Tensor, verifier: Verifier) -> torch.Tensor:
    """CoSD's token per row [N]: y where x != y and the verifier picks the assistant, else x."""
    x, y, feats = candidates(draft_logits, assist_logits)
    return torch.where((x != y) & verifier.picks_assistant(feats), y, x)


# Every other token sits this far below the choice (plus the assistant's log p): r is exactly
# one-hot after softmax (e^-10000 underflows even in float64), yet a request control that masks
# the choice (a grammar, bad_words, allowed_token_ids) leaves the assistant's best allowed token
# instead of an empty distribution.
FALLBACK_OFFSET = -1.0e4


def cosd_log_r(member_logits: torch.Tensor,  # [num_models, N, V] raw logits, config order
               draft: int, assistant: int, verifier: Verifier) -> torch.Tensor:
    """log r [N, V]: 0 at CoSD's choice; FALLBACK_OFFSET + log p_assist elsewhere."""
    token = choose(member_logits[draft], member_logits[assistant], verifier)
    fallback = FALLBACK_OFFSET + torch.log_softmax(member_logits[assistant].float(), dim=-1)
    return fallback.scatter_(-1, token.unsqueeze(-1), 0.0)


# ---------------------------------------------------------------------------- tree JSON

def parse_tree(data) -> Tree:
    """Validate a tree's plain data (raises :class:`TreeError` with the problem)."""
    if not isinstance(data, Mapping):
        raise TreeError(f"must be a JSON object with 'nodes', got {type(data).__name__}")
    unknown = sorted(set(data) - _TREE_KEYS)
    if unknown:
        raise TreeError(f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_TREE_KEYS))})")
    if "format" in data and data["format"] != TREE_FORMAT:
        raise TreeError(f"format must be {TREE_FORMAT!r}, got {data['format']!r}")
    if "features" in data and list(data["features"]) != list(FEATURES):
        raise TreeError(f"features must be {list(FEATURES)}, got {data['features']!r}")
    nodes = data.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise TreeError("'nodes' must be a non-empty list")
    parsed = [_parse_node(node, i, len(nodes)) for i, node in enumerate(nodes)]
    depth = _check_structure(parsed)
    return Tree(feature=tuple(p[0] for p in parsed), threshold=tuple(p[1] for p in parsed),
                left=tuple(p[2] for p in parsed), right=tuple(p[3] for p in parsed),
                value=tuple(p[4] for p in parsed), depth=depth)


def _parse_node(node, i: int, count: int) -> tuple[int, float, int, int, int]:
    """(feature, threshold, left, right, value) of nodes[i]; a leaf points to itself."""
    where = f"nodes[{i}]"
    if not isinstance(node, Mapping):
        raise TreeError(f"{where}: must be an object, got {type(node).__name__}")
    if "leaf" in node:
        _check_node_keys(node, where, {"leaf"})
        leaf = node["leaf"]
        if isinstance(leaf, bool) or not isinstance(leaf, int) or leaf not in (0, 1):
            raise TreeError(f"{where}.leaf: must be 0 (keep x) or 1 (pick y), got {leaf!r}")
        return 0, 0.0, i, i, leaf
    _check_node_keys(node, where, {"feature", "threshold", "left", "right"})
    feature, threshold = node["feature"], node["threshold"]
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < len(FEATURES):
        raise TreeError(f"{where}.feature: must be an integer in [0, {len(FEATURES)}), got {feature!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise TreeError(f"{where}.threshold: must be a finite number, got {threshold!r}")
    children = []
    for side in ("left", "right"):
        child = node[side]
        if isinstance(child, bool) or not isinstance(child, int) or not 0 <= child < count or child == i:
            raise TreeError(f"{where}.{side}: must be the index of another node (0..{count - 1}), got {child!r}")
        children.append(child)
    return feature, float(threshold), children[0], children[1], 0


def _check_node_keys(node: Mapping, where: str, required: set[str]) -> None:
    for key in node:
        if key not in required | _INFO_KEYS:
            raise TreeError(f"{where}: unknown key {key!r} (a node is a leaf {{leaf}} or a split "
                            "{feature, threshold, left, right})")
    missing = sorted(required - set(node))
    if missing:
        raise TreeError(f"{where}: missing {missing[0]!r}")


def _check_structure(parsed: list[tuple]) -> int:
    """Every node but the root has exactly one parent and is reachable from the root; returns
    the depth (edges on the longest root-to-leaf path)."""
    parents: dict[int, int] = {}
    for i, (_, _, left, right, _) in enumerate(parsed):
        if left == i:
            continue  # leaf
        if left == right:
            raise TreeError(f"nodes[{i}]: left and right are the same node ({left})")
        for child in (left, right):
            if child == 0:
                raise TreeError(f"nodes[{i}]: points back to the root (nodes[0])")
            if child in parents:
                raise TreeError(f"nodes[{child}] has two parents (nodes[{parents[child]}] and nodes[{i}])")
            parents[child] = i
    depth, frontier, seen = 0, [0], {0}
    while True:
        frontier = [c for n in frontier if parsed[n][2] != n for c in (parsed[n][2], parsed[n][3])]
        if not frontier:
            break
        depth += 1
        seen.update(frontier)
        if depth > MAX_TREE_DEPTH:
            raise TreeError(f"deeper than {MAX_TREE_DEPTH} levels")
    unreachable = sorted(set(range(len(parsed))) - seen)
    if unreachable:
        raise TreeError(f"nodes[{unreachable[0]}] is not reachable from the root (nodes[0])")
    return depth


def load_tree(path: str | Path) -> Tree:
    """Read and validate a tree JSON file; errors name the file and the problem."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise TreeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise TreeError(f"{path}: not valid JSON ({exc})") from None
    try:
        return parse_tree(data)
    except TreeError as exc:
        raise TreeError(f"{path}: {exc}") from None


def tree_to_data(nodes: list[dict], meta: Mapping | None = None) -> dict:
    """The JSON form of a tree (validated)."""
    data = {"format": TREE_FORMAT, "features": list(FEATURES), "nodes": nodes}
    if meta:
        data["meta"] = dict(meta)
    parse_tree(data)
    return data


# ---------------------------------------------------------------------------- rule / reference

def verifier_from_rule(rule) -> Verifier:
    """The verifier of a ``cosd`` :class:`~vllm_cos.config.RuleSpec`."""
    if rule.verifier == "tree":
        return TreeVerifier(load_tree(rule.tree))
    return RuleVerifier(rule.alpha, rule.beta)


def build_cosd(rule, model_names: Sequence[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The combine function of a ``cosd`` rule (``vllm_cos.combine.RULES['cosd']``)."""
    names = list(model_names)
    draft, assistant, verifier = names.index(rule.draft), names.index(rule.assistant), verifier_from_rule(rule)
    return lambda member_logits: cosd_log_r(member_logits, draft, assistant, verifier)


@dataclass
class CoSDOutput:
    token_ids: list[int]
    rounds: int = 0  # draft-then-verify rounds
    replaced: int = 0  # draft tokens replaced by the assistant's


LogitsFn = Callable[[list[int]], torch.Tensor]  # token ids -> logits [len, V] at every position


def reference_decode(draft: LogitsFn, assistant: LogitsFn, verifier: Verifier, prompt: Sequence[int],
                     max_tokens: int, gamma: int, eos_token_id: int | None = None) -> CoSDOutput:
    """Plain-Python CoSD on one prompt: the draft model drafts gamma tokens greedily, the
    assistant scores them in one forward, the verifier keeps or replaces each in turn, and
    drafting restarts after the first replacement (no KV caches: every call is a full forward)."""
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    out = CoSDOutput(token_ids=[])
    tokens = out.token_ids
    while len(tokens) < max_tokens:
        context = list(prompt) + tokens
        drafts, draft_rows = [], []
        for _ in range(min(gamma, max_tokens - len(tokens))):
            row = draft(context + drafts)[-1]
            draft_rows.append(row)
            drafts.append(int(row.argmax()))
        assist_rows = assistant(context + drafts[:-1])[-len(drafts):]  # [k, V]: one forward
        chosen = choose(torch.stack(draft_rows), assist_rows, verifier).tolist()
        out.rounds += 1
        for x, token in zip(drafts, chosen):
            tokens.append(token)
            if token == eos_token_id:
                return out
            if token != x:
                out.replaced += 1
                break
    return out
