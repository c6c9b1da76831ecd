"""Train CoSD's decision-tree verifier: a small CART tree over the two models' confidences.

    .venv/bin/python scripts/train_cosd_tree.py            # shared models, writes configs/cosd-tree.json
    .venv/bin/python scripts/train_cosd_tree.py --models-dir models/tiny --draft small --assistant large \\
        --text vllm_cos --tokens 4000 --out /tmp/tree.json

Labelled set (teacher forced on text files): at every position where the draft's top token x
and the assistant's top token y differ, label 1 if y is the true next token, 0 if x is, and
skip the position otherwise.  Features: :data:`vllm_cos.cosd.FEATURES` (p_draft(x),
p_assist(y), p_assist(x), p_draft(y)).  Files are split into training and held-out files; the
held-out accuracy of the tree is reported next to the rule verifier's (alpha = beta = 0.5) and
the trivial "always x" / "always y", overall and per text source, and stored in the JSON's meta.

Defaults: draft expert-a (general Python), assistant expert-b (numeric Python) of
/work/shared/models -- two experts of different domains, the pairing CoSD is for (fusing
complementary knowledge; with large/small the large model is better almost everywhere and the
tree would learn "mostly trust large").  Text: Python packages of this interpreter that were not
on the machine the models were trained on (none of them is among the package groups of
/work/shared/models/metadata.json): general -- starlette, uvicorn, jsonschema, lark;
numeric/ML -- vllm's model_executor/layers, v1/sample and v1/attention, compressed_tensors.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from vllm_cos.cosd import FEATURES, RuleVerifier, TreeVerifier, candidates, parse_tree, tree_to_data  # noqa: E402

SITE = Path(sysconfig.get_paths()["purelib"])
DEFAULT_TEXT = [SITE / p for p in ("starlette", "uvicorn", "jsonschema", "lark",  # general Python
                                   "vllm/model_executor/layers", "vllm/v1/sample", "vllm/v1/attention",
                                   "compressed_tensors")]  # numeric / ML Python
MAX_FILE_BYTES = 1_000_000  # the zoo trainer's filters: files over 1 MB, non-UTF-8 files and
MAX_LINE_CHARS = 2000  # files with lines over 2000 characters were skipped


# ---------------------------------------------------------------------------- text

def source_files(source: Path, seed: int) -> list[Path]:
    """A source's Python files (a file, or a folder searched recursively), filtered like the
    models' training corpus, in a seeded random order."""
    files = [source] if source.is_file() else sorted(source.rglob("*.py"))
    kept = []
    for f in files:
        if f.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip() and max(len(line) for line in text.splitlines() or [""]) <= MAX_LINE_CHARS:
            kept.append(f)
    random.Random(seed).shuffle(kept)
    return kept


def token_streams(sources: list[Path], tokenizer, tokens: int, held_out: float, seed: int) -> dict:
    """{(source, split): token ids} with about ``tokens / len(sources)`` tokens per source; a
    file goes wholly to one split (every ``round(1 / held_out)``-th file is held out), each file
    prefixed with </s> as the training documents were."""
    every = max(2, round(1 / held_out))
    per_source = tokens / len(sources)
    budgets = {"train": per_source * (1 - 1 / every), "held_out": per_source / every}
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    streams: dict = {}
    for source in sources:
        counts = dict.fromkeys(budgets, 0)
        for i, f in enumerate(source_files(source, seed)):
            split = "held_out" if i % every == every - 1 else "train"
            if all(counts[s] >= budgets[s] for s in budgets):
                break
            if counts[split] >= budgets[split]:
                continue
            ids = sep + tokenizer.encode(f.read_text(encoding="utf-8"), add_special_tokens=False)
            streams.setdefault((str(source), split), []).extend(ids)
            counts[split] += len(ids)
    return streams


# ---------------------------------------------------------------------------- labelled set

@torch.inference_mode()
def labelled(draft, assistant, ids: list[int], window: int, batch: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Features [n, 4] and labels [n] (1: y is the true next token, 0: x is) of one token
    stream, teacher forced in windows of ``window`` tokens; and the position counts."""
    usable = (len(ids) - 1) // window * window
    if usable == 0:
        return np.zeros((0, len(FEATURES)), np.float32), np.zeros(0, np.int64), {"positions": 0, "disagree": 0}
    inputs = torch.tensor(ids[:usable]).view(-1, window)
    targets = torch.tensor(ids[1:usable + 1]).view(-1, window)
    feats, labels, disagree = [], [], 0
    vocab = min(draft.config.vocab_size, assistant.config.vocab_size)
    for start in range(0, inputs.shape[0], batch):
        chunk = inputs[start:start + batch]
        d_logits = draft(chunk).logits[..., :vocab].flatten(0, 1)
        a_logits = assistant(chunk).logits[..., :vocab].flatten(0, 1)
        x, y, f = candidates(d_logits, a_logits)
        true = targets[start:start + batch].flatten()
        differ = x != y
        keep = differ & ((true == x) | (true == y))
        disagree += int(differ.sum())
        feats.append(f[keep].numpy())
        labels.append((true == y)[keep].long().numpy())
    return np.concatenate(feats), np.concatenate(labels), {"positions": usable, "disagree": disagree}


# ---------------------------------------------------------------------------- CART

def _gini(count: np.ndarray, ones: np.ndarray) -> np.ndarray:
    """count * Gini impurity of nodes with ``ones`` positive labels out of ``count``."""
    p = ones / np.maximum(count, 1)
    return 2.0 * count * p * (1.0 - p)


def best_split(X: np.ndarray, y: np.ndarray, min_leaf: int) -> tuple[int, float] | None:
    """The (feature, threshold) with the lowest weighted Gini impurity, ``x <= threshold`` going
    left, each side at least ``min_leaf`` samples; None when no split lowers the impurity."""
    n = len(y)
    best, best_score = None, _gini(np.array(n), np.array(y.sum())) - 1e-9
    for feature in range(X.shape[1]):
        order = np.argsort(X[:, feature], kind="stable")
        xs, ys = X[order, feature], y[order]
        ones_left = np.cumsum(ys)[:-1]
        count_left = np.arange(1, n)
        score = _gini(count_left, ones_left) + _gini(n - count_left, ys.sum() - ones_left)
        valid = (xs[:-1] < xs[1:]) & (count_left >= min_leaf) & (n - count_left >= min_leaf)
        if not valid.any():
            continue
        k = int(np.argmin(np.where(valid, score, np.inf)))
        if score[k] < best_score:
            best_score = score[k]
            best = (feature, (float(xs[k]) + float(xs[k + 1])) / 2.0)
    return best


def fit_cart(X: np.ndarray, y: np.ndarray, max_depth: int = 4, min_leaf: int = 50) -> list[dict]:
    """A CART classification tree (Gini) as :mod:`vllm_cos.cosd` tree nodes (node 0 the root);
    a split whose two leaves predict the same label is folded into one leaf."""
    nodes: list[dict] = []

    def grow(index: np.ndarray, depth: int) -> int:
        i = len(nodes)
        labels = y[index]
        y_rate = float(labels.mean()) if len(index) else 0.0
        info = {"samples": int(len(index)), "y_rate": round(y_rate, 4)}
        nodes.append({"leaf": int(y_rate > 0.5), **info})
        split = best_split(X[index], labels, min_leaf) if depth < max_depth and len(index) else None
        if split is None:
            return i
        feature, threshold = split
        go_left = X[index, feature] <= threshold
        left, right = grow(index[go_left], depth + 1), grow(index[~go_left], depth + 1)
        if "leaf" in nodes[left] and "leaf" in nodes[right] and nodes[left]["leaf"] == nodes[right]["leaf"]:
            del nodes[left:]  # both children are leaves of the same label: keep the leaf
            return i
        nodes[i] = {"feature": feature, "threshold": threshold, "left": left, "right": right, **info}
        return i

    grow(np.arange(len(y)), 0)
    return nodes


# ---------------------------------------------------------------------------- main

def accuracies(feats: np.ndarray, labels: np.ndarray, tree_verifier) -> dict:
    """Held-out accuracy (picks that are the true token) of each verifier."""
    if len(labels) == 0:
        return {"positions": 0}
    f = torch.from_numpy(feats)
    picks = {"tree": tree_verifier.picks_assistant(f).numpy(), "rule": RuleVerifier().picks_assistant(f).numpy(),
             "always_x": np.zeros(len(labels), bool), "always_y": np.ones(len(labels), bool)}
    return {"positions": int(len(labels)), **{k: round(float((v == (labels == 1)).mean()), 4) for k, v in picks.items()}}


def load(models_dir: Path, name: str):
    from transformers import AutoModelForCausalLM

    path = models_dir / name
    if not (path / "config.json").is_file():
        raise SystemExit(f"train_cosd_tree: no model {name!r} in {models_dir}")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def build_sets(args) -> tuple[dict, dict]:
    """{split: (features, labels)} pooled over the text sources, and per source {split:
    (features, labels, counts)}."""
    from transformers import AutoTokenizer

    models_dir = Path(args.models_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(models_dir / args.draft))
    tokenizer.model_max_length = 1 << 30  # whole files are tokenized, then cut into windows
    draft, assistant = load(models_dir, args.draft), load(models_dir, args.assistant)
    sources = [Path(t).resolve() for t in args.text]
    per_source: dict = {}
    for (source, split), ids in sorted(token_streams(sources, tokenizer, args.tokens, args.held_out,
                                                     args.seed).items()):
        feats, labels, counts = labelled(draft, assistant, ids, args.window, args.batch)
        per_source.setdefault(_short(source), {})[split] = (feats, labels, {"tokens": len(ids), **counts})
    pooled = {}
    for split in ("train", "held_out"):
        parts = [s[split] for s in per_source.values() if split in s]
        pooled[split] = (np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, len(FEATURES)), np.float32),
                         np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64))
    return pooled, per_source


def train(args) -> dict:
    pooled, per_source = build_sets(args)
    X, y = pooled["train"]
    if len(y) == 0:
        raise SystemExit("train_cosd_tree: no labelled training positions (more --tokens or --text?)")
    nodes = fit_cart(X, y, args.depth, args.min_leaf)
    verifier = TreeVerifier(parse_tree({"nodes": nodes}))
    sources = {name: {**{split: {**counts, "labelled": int(len(labels))} for split, (_, labels, counts) in s.items()},
                      "held_out_accuracy": accuracies(*s["held_out"][:2], verifier) if "held_out" in s else None}
               for name, s in per_source.items()}
    held = pooled["held_out"]
    meta = {"draft": args.draft, "assistant": args.assistant, "models_dir": str(args.models_dir),
            "depth": verifier.tree.depth, "max_depth": args.depth, "min_leaf": args.min_leaf,
            "window": args.window, "seed": args.seed, "train_labelled": int(len(y)),
            "train_y_rate": round(float(y.mean()), 4), "train_accuracy": accuracies(X, y, verifier),
            "held_out_labelled": int(len(held[1])), "held_out_accuracy": accuracies(*held, verifier),
            "rule": {"alpha": RuleVerifier().alpha, "beta": RuleVerifier().beta}, "sources": sources,
            "command": f"scripts/train_cosd_tree.py {args.command}".strip()}
    return tree_to_data(nodes, meta)


def _short(source: str) -> str:
    for base in (SITE, REPO_ROOT):
        if source.startswith(str(base) + "/"):
            return source[len(str(base)) + 1:]
    return source


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models-dir", default="/work/shared/models")
    p.add_argument("--draft", default="expert-a")
    p.add_argument("--assistant", default="expert-b")
    p.add_argument("--text", nargs="+", default=[str(t) for t in DEFAULT_TEXT],
                   help="Python files or folders (one text source each, budget shared equally)")
    p.add_argument("--tokens", type=int, default=400_000, help="tokens of text in all (train + held out)")
    p.add_argument("--held-out", type=float, default=0.2, help="share of each source's files held out")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--depth", type=int, default=4, help="maximum depth of the tree (<= 4 recommended)")
    p.add_argument("--min-leaf", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO_ROOT / "configs" / "cosd-tree.json"))
    args = p.parse_args(argv)
    args.command = " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    data = train(args)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    meta = data["meta"]
    print(f"tree of depth {meta['depth']} on {meta['train_labelled']} labelled positions -> {args.out}")
    print(f"held-out ({meta['held_out_labelled']} positions) accuracy: {meta['held_out_accuracy']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
