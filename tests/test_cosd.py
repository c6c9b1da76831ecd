"""CoSD (vllm_cos.cosd): the rule and tree verifiers, the tree JSON, the CART trainer (no engine)."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_cos.config import ConfigError, load_config
from vllm_cos.cosd import (FEATURES, RuleVerifier, TreeError, TreeVerifier, candidates, choose, cosd_log_r,
                           load_tree, parse_tree, reference_decode)

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 8


def _logits(*rows: dict[int, float]) -> torch.Tensor:
    """[len(rows), VOCAB] logits = log p of hand-made distributions (the rest spread evenly)."""
    out = []
    for probs in rows:
        rest = (1.0 - sum(probs.values())) / (VOCAB - len(probs))
        out.append([math.log(probs.get(t, rest)) for t in range(VOCAB)])
    return torch.tensor(out)


# ---------------------------------------------------------------------------- rule verifier

@pytest.mark.parametrize("draft, assist, expected", [
    ({0: 0.4, 1: 0.3}, {1: 0.6}, 1),  # p_d(x) < alpha, p_a(y) > beta p_d(x): y
    ({0: 0.6, 1: 0.3}, {1: 0.9}, 0),  # a confident draft is kept
    ({0: 0.4, 1: 0.1}, {1: 0.19}, 0),  # p_a(y) = 0.19 < 0.5 * 0.4: x
    ({0: 0.4, 1: 0.1}, {1: 0.21}, 1),  # 0.21 > 0.2: y
    ({3: 0.3}, {3: 0.9}, 3),  # x == y: nothing to replace
    ({2: 0.2, 5: 0.19}, {5: 0.7, 2: 0.01}, 5),  # y is the draft's second choice
])
def test_rule_on_hand_made_distributions(draft, assist, expected):
    token = choose(_logits(draft), _logits(assist), RuleVerifier())
    assert token.tolist() == [expected]


def test_rule_thresholds_are_strict():
    rule = RuleVerifier(alpha=0.5, beta=0.5)
    feats = torch.tensor([[0.5, 0.9, 0.0, 0.0],  # p_d(x) == alpha: keep x
                          [0.4999, 0.9, 0.0, 0.0],
                          [0.25, 0.125, 0.0, 0.0],  # p_a(y) == beta p_d(x): keep x
                          [0.25, 0.1251, 0.0, 0.0]])
    assert rule.picks_assistant(feats).tolist() == [False, True, False, True]
    assert RuleVerifier(alpha=1.0, beta=0.01).picks_assistant(feats).all()
    assert not RuleVerifier(alpha=0.1).picks_assistant(feats).any()


def test_features_and_log_r_in_config_order():
    draft, assist = _logits({0: 0.4, 1: 0.3}), _logits({1: 0.6, 0: 0.1})
    x, y, feats = candidates(draft, assist)
    assert (x.item(), y.item()) == (0, 1) and len(FEATURES) == feats.shape[1] == 4
    assert torch.allclose(feats, torch.tensor([[0.4, 0.6, 0.1, 0.3]]), atol=1e-6)
    log_r = cosd_log_r(torch.stack([assist, draft]), draft=1, assistant=0, verifier=RuleVerifier())
    assert log_r.shape == (1, VOCAB) and log_r[0, 1] == 0 and (log_r[0, [0, *range(2, VOCAB)]] < -1e3).all()
    assert torch.softmax(log_r, -1)[0, 1] == 1.0
    # a control that masks the choice leaves the assistant's best allowed token, not an empty r
    masked = log_r.clone()
    masked[0, 1] = float("-inf")
    p = torch.softmax(masked, -1)[0]
    allowed = assist[0].clone()
    allowed[1] = float("-inf")
    assert torch.isfinite(p).all() and int(p.argmax()) == int(allowed.argmax())


def _python_rule(draft_row: torch.Tensor, assist_row: torch.Tensor, alpha: float, beta: float) -> int:
    p_d, p_a = torch.softmax(draft_row, -1).tolist(), torch.softmax(assist_row, -1).tolist()
    x, y = max(range(len(p_d)), key=p_d.__getitem__), max(range(len(p_a)), key=p_a.__getitem__)
    return y if x != y and p_d[x] < alpha and p_a[y] > beta * p_d[x] else x


def test_batched_rule_equals_a_python_loop_over_rows():
    gen = torch.Generator().manual_seed(0)
    draft, assist = torch.randn(500, 64, generator=gen) * 2, torch.randn(500, 64, generator=gen) * 2
    for alpha, beta in ((0.5, 0.5), (0.3, 2.0), (1.0, 0.1)):
        batched = choose(draft, assist, RuleVerifier(alpha, beta)).tolist()
        assert batched == [_python_rule(d, a, alpha, beta) for d, a in zip(draft, assist)]
    assert len({*batched}) > 10 and batched != draft.argmax(-1).tolist()


# ---------------------------------------------------------------------------- tree verifier

def _random_tree(rng: random.Random, max_depth: int) -> list[dict]:
    nodes: list[dict] = []

    def grow(depth: int) -> int:
        i = len(nodes)
        nodes.append({"leaf": rng.randint(0, 1)})
        if depth < max_depth and rng.random() < 0.8:
            node = {"feature": rng.randrange(4), "threshold": rng.random()}
            node["left"], node["right"] = grow(depth + 1), grow(depth + 1)
            nodes[i] = node
        return i

    grow(0)
    return nodes


def _python_walk(nodes: list[dict], feats: list[float]) -> int:
    node = nodes[0]
    while "leaf" not in node:
        node = nodes[node["left"] if feats[node["feature"]] <= node["threshold"] else node["right"]]
    return node["leaf"]


def test_tree_walk_equals_a_python_walk_on_random_features():
    rng = random.Random(0)
    feats = torch.rand(400, 4, generator=torch.Generator().manual_seed(1))
    feats[:5] = torch.tensor([0.25, 0.5, 0.75, 0.125])  # ties with thresholds below
    for trial in range(30):
        nodes = _random_tree(rng, max_depth=rng.randint(0, 5))
        if trial % 3 == 0 and "feature" in nodes[0]:
            nodes[0]["threshold"] = 0.25 if nodes[0]["feature"] == 0 else 0.5
        tree = parse_tree({"nodes": nodes})
        got = TreeVerifier(tree).picks_assistant(feats).tolist()
        assert got == [bool(_python_walk(nodes, row)) for row in feats.tolist()], nodes


def test_tree_choice_only_replaces_where_the_models_disagree():
    always_y = TreeVerifier(parse_tree({"nodes": [{"leaf": 1}]}))
    draft, assist = _logits({0: 0.9}, {2: 0.9}), _logits({1: 0.9}, {2: 0.9})
    assert choose(draft, assist, always_y).tolist() == [1, 2]
    assert parse_tree({"nodes": [{"leaf": 1}]}).depth == 0


def _split(feature=0, threshold=0.5, left=1, right=2):
    return {"feature": feature, "threshold": threshold, "left": left, "right": right}


GOOD = [_split(), {"leaf": 0}, {"leaf": 1}]


@pytest.mark.parametrize("data, words", [
    ([GOOD], "must be a JSON object"),
    ({"nodes": []}, "'nodes' must be a non-empty list"),
    ({"nodes": GOOD, "colour": 1}, "unknown key 'colour'"),
    ({"nodes": GOOD, "features": ["a", "b", "c", "d"]}, "features must be"),
    ({"nodes": GOOD, "format": "tree/9"}, "format must be"),
    ({"nodes": [_split(feature=4), {"leaf": 0}, {"leaf": 1}]}, "nodes[0].feature: must be an integer in [0, 4)"),
    ({"nodes": [_split(feature=True), {"leaf": 0}, {"leaf": 1}]}, "nodes[0].feature"),
    ({"nodes": [_split(threshold=float("nan")), {"leaf": 0}, {"leaf": 1}]}, "nodes[0].threshold: must be a finite"),
    ({"nodes": [_split(threshold="0.5"), {"leaf": 0}, {"leaf": 1}]}, "nodes[0].threshold"),
    ({"nodes": [_split(right=3), {"leaf": 0}, {"leaf": 1}]}, "nodes[0].right: must be the index of another node"),
    ({"nodes": [_split(left=0), {"leaf": 0}, {"leaf": 1}]}, "nodes[0].left"),
    ({"nodes": [_split(right=1), {"leaf": 0}, {"leaf": 1}]}, "left and right are the same node"),
    ({"nodes": [_split(), _split(left=3, right=0), {"leaf": 1}, {"leaf": 0}]}, "points back to the root"),
    ({"nodes": [_split(), _split(left=3, right=2), {"leaf": 1}, {"leaf": 0}]}, "nodes[2] has two parents"),
    ({"nodes": [{"leaf": 0}, {"leaf": 1}]}, "nodes[1] is not reachable from the root"),
    ({"nodes": [_split(), {"leaf": 2}, {"leaf": 1}]}, "nodes[1].leaf: must be 0 (keep x) or 1 (pick y)"),
    ({"nodes": [_split(), {"leaf": True}, {"leaf": 1}]}, "nodes[1].leaf"),
    ({"nodes": [_split(), {"leaf": 0, "depth": 3}, {"leaf": 1}]}, "nodes[1]: unknown key 'depth'"),
    ({"nodes": [{"feature": 0, "threshold": 0.5, "left": 1}, {"leaf": 0}, {"leaf": 1}]}, "nodes[0]: missing 'right'"),
    ({"nodes": ["leaf"]}, "nodes[0]: must be an object"),
])
def test_tree_json_errors_name_the_problem(data, words):
    with pytest.raises(TreeError) as info:
        parse_tree(data)
    assert words in str(info.value)


def test_deep_tree_is_refused():
    with pytest.raises(TreeError, match="deeper than 16 levels"):
        parse_tree({"nodes": _chain(17)})
    assert parse_tree({"nodes": _chain(16)}).depth == 16


def _chain(depth: int) -> list[dict]:
    """A tree that is a chain of ``depth`` splits (node 2k a split, 2k + 1 its leaf)."""
    nodes = []
    for k in range(depth):
        nodes += [_split(left=2 * k + 1, right=2 * k + 2), {"leaf": k % 2}]
    return nodes + [{"leaf": 1}]


def test_tree_file_errors_name_the_file(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"nodes": GOOD, "features": list(FEATURES), "meta": {"note": "hand-made"}}))
    assert load_tree(good).depth == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{nodes: [")
    for path, words in ((bad, "not valid JSON"), (tmp_path / "missing.json", "cannot read")):
        with pytest.raises(TreeError, match=f"^{path}: {words}"):
            load_tree(path)
    bad.write_text(json.dumps({"nodes": [_split(feature=7), {"leaf": 0}, {"leaf": 1}]}))
    with pytest.raises(TreeError, match=rf"^{bad}: nodes\[0\].feature"):
        load_tree(bad)


# ---------------------------------------------------------------------------- config

@pytest.fixture
def model_dirs(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    (tmp_path / "tree.json").write_text(json.dumps({"nodes": GOOD}))
    (tmp_path / "bad-tree.json").write_text(json.dumps({"nodes": [_split(right=9), {"leaf": 0}, {"leaf": 1}]}))
    return tmp_path


def test_tree_config_resolves_the_file_and_round_trips(model_dirs):
    path = model_dirs / "cos.yaml"
    path.write_text("models: [{name: a, path: a}, {name: b, path: b, gamma: 3}]\n"
                    "rule: {name: cosd, draft: b, assistant: a, verifier: tree, tree: tree.json}\n"
                    "schedule: naive\nproposer: b\n")
    cfg = load_config(path)
    assert cfg.rule.tree == str((model_dirs / "tree.json").resolve()) and cfg.rule.verifier == "tree"
    assert load_config(cfg.to_dict()) == cfg
    assert cfg.to_dict()["rule"] == {"name": "cosd", "draft": "b", "assistant": "a", "verifier": "tree",
                                     "tree": cfg.rule.tree}


def _cosd_raw(model_dirs, **rule):
    return {"models": [{"name": "a", "path": str(model_dirs / "a")}, {"name": "b", "path": str(model_dirs / "b")}],
            "rule": {"name": "cosd", "draft": "b", "assistant": "a", **rule}, "schedule": "naive", "proposer": "b"}


def test_tree_config_errors_name_the_field_and_the_file(model_dirs):
    for rule, words in (({"verifier": "tree"}, "missing"),
                        ({"verifier": "tree", "tree": "nope.json"}, "nope.json: cannot read"),
                        ({"verifier": "tree", "tree": str(model_dirs / "bad-tree.json")},
                         f"{model_dirs / 'bad-tree.json'}: nodes[0].right"),
                        ({"verifier": "tree", "tree": 3}, "must be the path"),
                        ({"tree": str(model_dirs / "tree.json")}, "only with verifier: tree")):
        with pytest.raises(ConfigError) as info:
            load_config(_cosd_raw(model_dirs, **rule))
        assert info.value.field == "rule.tree" and words in str(info.value), str(info.value)


def test_engine_spec_resolves_the_tree_against_the_file(model_dirs):
    from vllm_cos.engine import _served_spec

    (model_dirs / "cos.yaml").write_text(
        "models: [{name: a, path: a}, {name: b, path: b, gamma: 3}]\n"
        "rule: {name: cosd, draft: b, assistant: a, verifier: tree, tree: tree.json}\nschedule: naive\n")
    raw = _served_spec(str(model_dirs / "cos.yaml"), str(model_dirs / "a"))
    assert raw["rule"]["tree"] == str(model_dirs / "tree.json")


# ---------------------------------------------------------------------------- reference loop

def test_reference_decode_restarts_after_the_first_replacement():
    """Hand-made 'models' over token ids: the draft always proposes 0; the assistant's top
    token is 1 (and confident) exactly at positions 3 and 5 of the output."""
    def draft(ids):
        return _logits(*[{0: 0.4}] * len(ids))

    def assistant(ids):
        return _logits(*[{1: 0.9} if i - 1 in (3, 5) else {0: 0.9} for i in range(len(ids))])

    out = reference_decode(draft, assistant, RuleVerifier(), [7, 7], max_tokens=8, gamma=3)
    assert out.token_ids == [0, 0, 0, 1, 0, 1, 0, 0] and out.replaced == 2
    assert out.rounds == 4  # [0 0 0] [1] [0 1] [0 0]
    assert reference_decode(draft, assistant, RuleVerifier(), [7, 7], 8, 3, eos_token_id=1).token_ids == [0, 0, 0, 1]


# ---------------------------------------------------------------------------- trainer

@pytest.fixture(scope="module")
def trainer():
    spec = importlib.util.spec_from_file_location("train_cosd_tree", REPO_ROOT / "scripts" / "train_cosd_tree.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_cosd_tree"] = module
    spec.loader.exec_module(module)
    return module


def test_cart_fits_a_separable_set(trainer):
    rng = np.random.default_rng(0)
    X = rng.random((2000, 4)).astype(np.float32)
    y = ((X[:, 1] > 0.3) & (X[:, 0] <= 0.6)).astype(np.int64)
    nodes = trainer.fit_cart(X, y, max_depth=2, min_leaf=5)
    tree = parse_tree({"nodes": nodes})
    picks = TreeVerifier(tree).picks_assistant(torch.from_numpy(X)).numpy()
    assert tree.depth == 2 and (picks == (y == 1)).all()
    splits = {(n["feature"], round(n["threshold"], 1)) for n in nodes if "feature" in n}
    assert splits == {(0, 0.6), (1, 0.3)}
    one = trainer.fit_cart(X, (X[:, 2] > 0.5).astype(np.int64), max_depth=4, min_leaf=5)
    assert len(one) == 3 and one[0]["feature"] == 2 and abs(one[0]["threshold"] - 0.5) < 0.01  # leaves folded
    assert trainer.fit_cart(X, np.ones(2000, np.int64)) == [{"leaf": 1, "samples": 2000, "y_rate": 1.0}]
    assert all(n["samples"] >= 400 for n in trainer.fit_cart(X, y, max_depth=4, min_leaf=400))


def test_trainer_smoke_run_on_the_tiny_models(trainer, tiny_models, tmp_path):
    out = tmp_path / "tree.json"
    models_dir = Path(tiny_models["large"]).parent
    assert trainer.main(["--models-dir", str(models_dir), "--draft", "small", "--assistant", "large",
                         "--text", str(REPO_ROOT / "vllm_cos"), "--tokens", "3000", "--window", "64",
                         "--depth", "3", "--min-leaf", "5", "--out", str(out)]) == 0
    tree = load_tree(out)
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert 1 <= tree.depth <= 3 == meta["max_depth"] and meta["depth"] == tree.depth
    assert data["features"] == list(FEATURES) and meta["train_labelled"] > 50 and meta["held_out_labelled"] > 50
    accuracy = meta["held_out_accuracy"]
    assert set(accuracy) == {"positions", "tree", "rule", "always_x", "always_y"}
    assert accuracy["always_x"] + accuracy["always_y"] == pytest.approx(1.0, abs=1e-3)
    assert meta["train_accuracy"]["tree"] >= max(meta["train_accuracy"]["always_x"], meta["train_accuracy"]["always_y"])
    cfg = load_config({"models": [{"name": "large", "path": str(tiny_models["large"])},
                                  {"name": "small", "path": str(tiny_models["small"])}],
                       "rule": {"name": "cosd", "draft": "small", "assistant": "large", "verifier": "tree",
                                "tree": str(out)}, "schedule": "naive"})
    assert cfg.rule.tree == str(out)
