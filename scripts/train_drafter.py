"""Fine-tune a collaborator as the proposer (drafter) toward the collaboration's r.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/train_drafter.py --config /tmp/we.yaml --proposer small \\
        --out /tmp/small-drafter --steps 200 --gamma 4 --positional 0.7 --focal 0.5 --chain 1.0
    # the held-out figures of a checkpoint, no training:
    .venv/bin/python scripts/train_drafter.py --config /tmp/we.yaml --proposer small \\
        --init /tmp/small-drafter --eval-only

r is the rule of ``--config`` over its collaborators' ORIGINAL weights (the proposer's own entry
included: the trained copy is a separate model), teacher forced on Python files of this machine
(default: the standard library; ``--text`` other files / folders), split by file into training
and held-out files.  Held-out figures, two ways: teacher forced (alpha_j, j = 1..gamma: position j
of a block conditioned on the TRUE previous tokens, and the mean accepted length
sum_j prod_{i<=j} alpha_i, draft tokens only, no bonus token), and "own drafts": after a context of
``--context`` true tokens the drafter samples its block itself, as in decoding, and alpha_j is
P(draft j accepted | drafts 1..j-1 accepted) under min(1, r/q) (exact along each sampled path).
``--blocks drafted`` trains on such blocks too.  Prints the held-out figures before and after, and
a JSON summary (``--json`` also writes it to a file).  See :mod:`vllm_cos.drafter_losses` for the
loss terms and :mod:`vllm_cos.drafter_blocks` for the drafted blocks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from vllm_cos.config import load_config  # noqa: E402
from vllm_cos.drafter_losses import DIVERGENCES  # noqa: E402
from vllm_cos.drafter_training import BLOCKS, TrainSettings, run  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="cos.yaml: collaborators and rule (r)")
    p.add_argument("--proposer", required=True, help="the collaborator (name in --config) to fine-tune")
    p.add_argument("--out", help="output checkpoint directory (omitted: nothing is written)")
    p.add_argument("--init", help="start from this checkpoint instead of the proposer's own path")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=8, help="windows per step")
    p.add_argument("--window", type=int, default=128, help="tokens per teacher-forced window")
    p.add_argument("--blocks", choices=BLOCKS, default="teacher",
                   help="train on teacher-forced blocks, or on blocks of the drafter's own drafts")
    p.add_argument("--context", type=int, default=32, help="true tokens before each drafted block")
    p.add_argument("--divergence", choices=DIVERGENCES, default="kl")
    p.add_argument("--positional", type=float, default=None, help="positional weight decay in (0, 1]")
    p.add_argument("--focal", type=float, default=0.0, help="weight of the first-error focal term")
    p.add_argument("--chain", type=float, default=0.0, help="weight of -(expected accepted length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", nargs="+", type=Path, help="Python files / folders (default: the standard library)")
    p.add_argument("--held-out", type=float, default=0.05, help="fraction of files held out (by file hash)")
    p.add_argument("--train-tokens", type=int, default=200_000)
    p.add_argument("--eval-tokens", type=int, default=20_000)
    p.add_argument("--save-dtype", default="source", help="source | float32 | float16 | bfloat16")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval-only", action="store_true", help="only the held-out figures of --init / the proposer")
    p.add_argument("--json", type=Path, help="also write the summary here")
    args = p.parse_args(argv)
    for flag in ("steps", "gamma", "batch", "window", "context", "train_tokens", "eval_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    if args.window < args.gamma:
        p.error(f"--window {args.window}: must be >= --gamma {args.gamma}")
    if args.window < args.context + args.gamma:
        p.error(f"--window {args.window}: must be >= --context {args.context} + --gamma {args.gamma}")
    if args.positional is not None and not 0 < args.positional <= 1:
        p.error(f"--positional: must be in (0, 1], got {args.positional}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    settings = TrainSettings(steps=args.steps, gamma=args.gamma, lr=args.lr, batch=args.batch, window=args.window,
                             blocks=args.blocks, context=args.context,
                             divergence=args.divergence, positional=args.positional, focal=args.focal,
                             chain=args.chain, seed=args.seed)
    text = {"roots": args.text, "held_out": args.held_out, "train_tokens": args.train_tokens,
            "eval_tokens": args.eval_tokens}
    result = run(load_config(args.config), args.proposer, None if args.eval_only else args.out, settings,
                 init=args.init, device=args.device, text=text, eval_only=args.eval_only,
                 save_dtype=args.save_dtype)
    history = result.pop("history", None)
    if history:
        print(f"training loss: first step {history[0]['loss']:.4f}, last 10 steps "
              f"{sum(h['loss'] for h in history[-10:]) / len(history[-10:]):.4f}")
        result["train_loss_first"] = history[0]["loss"]
        result["train_loss_last10"] = sum(h["loss"] for h in history[-10:]) / len(history[-10:])
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
