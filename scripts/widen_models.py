#!/usr/bin/env python3
"""Widen trained Llama checkpoints without changing what they compute, so forwards cost more.

    python scripts/widen_models.py                                  # all four, default factors
    python scripts/widen_models.py --factor 4 --factor small=2.5    # one factor, one override
    python scripts/widen_models.py --models large --size large=1536,4096,8 --no-check

The tiny models in ``/work/shared/models`` are so small that an engine step is mostly engine
overhead.  Each widened copy has a larger hidden size D (was d), more attention heads (and KV
heads, same head_dim and q/kv group ratio) and a larger MLP, all zero-padded:

- embeddings / lm_head: zero columns d..D; every projection: zero rows/columns for new dims;
- new heads: zero q/k/v rows (uniform attention over zero values) and zero o_proj columns;
  they are appended after the old ones, so old q heads keep their KV heads (repeat_kv order);
- new MLP units: zero gate/up rows and zero down_proj columns (silu(0) * 0 = 0);
- biases (if any): zero-padded the same way;
- RMSNorm: with only d non-zero entries, mean_D(x^2) = (d/D) mean_d(x^2), so eps' = eps*d/D and
  the weights scaled by sqrt(d/D) (padded dims 0) give the same normalised output exactly in
  exact arithmetic.  The residual stream stays zero outside the first d dims.

Rope is untouched (head_dim unchanged); tokenizer, generation config and chat template files
are copied unchanged.  ``--check`` (default on) loads both with transformers in float32 and
requires max |logit difference| < ``--tol`` on held-out texts and identical greedy
continuations; it prints parameter counts, one batch-1 decode forward's time (32-token
context, ``--threads`` threads, best of ``--repeats``) and c = t(small)/t(large).
The stored dtype is the source's when the scaled norm weights are exact in it, else float32.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODELS = ("large", "small", "expert-a", "expert-b")
# large x6 (hidden 384 -> 2304): a forward ~18x the original's (1 thread).  small and the experts
# x4 (exact in float16: sqrt(1/4)), which puts c = t(model)/t(large) at ~0.1 and ~0.25.
DEFAULT_FACTORS = {"large": 6.0, "small": 4.0, "expert-a": 4.0, "expert-b": 4.0}
WEIGHT_FILE = "model.safetensors"
SKIP_FILES = {"config.json", "model.safetensors.index.json", "README.txt"}
HELDOUT_TEXTS = (
    "def moving_average(values, window):\n    total = 0.0\n    out = []\n    for i, v in enumerate(values):\n",
    "import numpy as np\n\n\ndef normalize(x, axis=-1, eps=1e-8):\n    norm = np.linalg.norm(x, axis=axis",
    "class LRUCache:\n    def __init__(self, capacity):\n        self.capacity = capacity\n        self.data = {}\n",
    "    with open(path, 'r', encoding='utf-8') as f:\n        for line in f:\n            if line.startswith('#'):",
)


@dataclass(frozen=True)
class Sizes:
    """The widths a widening changes (head_dim and the layer count never change)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int


def source_sizes(cfg: dict) -> Sizes:
    return Sizes(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                 cfg.get("num_key_value_heads") or cfg["num_attention_heads"])


def head_dim_of(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def scaled_sizes(old: Sizes, factor: float) -> Sizes:
    """Every width times ``factor`` (KV heads rounded, q heads = KV heads x the group ratio)."""
    if factor < 1:
        raise ValueError(f"factor {factor} < 1: widening cannot shrink a model")
    kv = max(old.kv_heads, round(old.kv_heads * factor))
    return Sizes(round(old.hidden * factor), round(old.intermediate * factor),
                 kv * (old.heads // old.kv_heads), kv)


def explicit_sizes(old: Sizes, spec: str) -> Sizes:
    """``HIDDEN,INTERMEDIATE[,KV_HEADS]``; KV heads default to scaling with the hidden size."""
    parts = [int(p) for p in spec.split(",")]
    if len(parts) not in (2, 3):
        raise ValueError(f"size {spec!r}: expected HIDDEN,INTERMEDIATE[,KV_HEADS]")
    kv = parts[2] if len(parts) == 3 else max(old.kv_heads, round(old.kv_heads * parts[0] / old.hidden))
    return Sizes(parts[0], parts[1], kv * (old.heads // old.kv_heads), kv)


def validate_sizes(old: Sizes, new: Sizes) -> None:
    for field in ("hidden", "intermediate", "heads", "kv_heads"):
        if getattr(new, field) < getattr(old, field):
            raise ValueError(f"target {field} {getattr(new, field)} < source {getattr(old, field)}")
    if old.heads % old.kv_heads or new.heads * old.kv_heads != old.heads * new.kv_heads:
        raise ValueError(f"heads {new.heads}/{new.kv_heads} break the q/kv group ratio "
                         f"{old.heads}/{old.kv_heads}")
    if new.hidden % new.heads:
        raise ValueError(f"hidden {new.hidden} is not a multiple of {new.heads} heads (transformers "
                         f"requires it)")


# Tensor name suffix -> symbolic shape.  V vocab, d hidden, q = heads*head_dim,
# k = kv_heads*head_dim, i intermediate.  Every symbol is zero-padded at its end.
SHAPES = {
    "embed_tokens.weight": "Vd", "lm_head.weight": "Vd", "norm.weight": "d",
    "q_proj.weight": "qd", "q_proj.bias": "q", "k_proj.weight": "kd", "k_proj.bias": "k",
    "v_proj.weight": "kd", "v_proj.bias": "k", "o_proj.weight": "dq", "o_proj.bias": "d",
    "gate_proj.weight": "id", "gate_proj.bias": "i", "up_proj.weight": "id", "up_proj.bias": "i",
    "down_proj.weight": "di", "down_proj.bias": "d", "rotary_emb.inv_freq": "",
}


def symbol_sizes(old: Sizes, new: Sizes, head_dim: int, vocab: int) -> dict[str, tuple[int, int]]:
    return {"V": (vocab, vocab), "d": (old.hidden, new.hidden),
            "q": (old.heads * head_dim, new.heads * head_dim),
            "k": (old.kv_heads * head_dim, new.kv_heads * head_dim),
            "i": (old.intermediate, new.intermediate)}


def shape_rule(name: str) -> str:
    for suffix, rule in SHAPES.items():
        if name.endswith(suffix):
            return rule
    raise ValueError(f"tensor {name!r}: not a Llama tensor this script knows how to widen")


def widen_tensor(name: str, t, symbols: dict[str, tuple[int, int]], norm_scale: float):
    """The zero-padded (and, for RMSNorm weights, scaled) copy of one tensor, in float64."""
    import torch

    rule = shape_rule(name)
    if rule == "":
        return t.double()
    expected = tuple(symbols[s][0] for s in rule)
    if tuple(t.shape) != expected:
        raise ValueError(f"tensor {name!r}: shape {tuple(t.shape)}, config implies {expected}")
    out = torch.zeros(tuple(symbols[s][1] for s in rule), dtype=torch.float64)
    out[tuple(slice(0, n) for n in expected)] = t.double()
    if rule == "d" and name.endswith("norm.weight"):
        out *= norm_scale
    return out


def load_state_dict(src: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src}: no *.safetensors weights (only safetensors checkpoints)")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def pick_dtype(state: dict, widened: dict, requested: str):
    """``requested``, or for ``auto`` the source dtype if every widened tensor is exact in it."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    src_dtype = next(iter(state.values())).dtype
    for t in widened.values():
        if not torch.equal(t.to(src_dtype).double(), t):
            return torch.float32
    return src_dtype


def widen_config(cfg: dict, old: Sizes, new: Sizes, dtype_name: str) -> dict:
    out = dict(cfg)
    out.update(hidden_size=new.hidden, intermediate_size=new.intermediate,
               num_attention_heads=new.heads, num_key_value_heads=new.kv_heads,
               head_dim=head_dim_of(cfg), rms_norm_eps=cfg["rms_norm_eps"] * old.hidden / new.hidden)
    out["dtype"] = dtype_name
    out.pop("torch_dtype", None)
    return out


def read_config(src: Path) -> dict:
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such model directory")
    path = src / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{src}: no config.json (not a Hugging Face checkpoint)")
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{src}: model_type {cfg.get('model_type')!r}, only 'llama' is supported")
    return cfg


def widen_checkpoint(src: Path, out: Path, new: Sizes | None = None, factor: float | None = None,
                     dtype: str = "auto") -> Sizes:
    """Write the widened copy of checkpoint ``src`` to ``out``; returns its sizes."""
    from safetensors.torch import save_file

    cfg = read_config(src)
    old = source_sizes(cfg)
    new = new or scaled_sizes(old, factor if factor is not None else 1.0)
    validate_sizes(old, new)
    symbols = symbol_sizes(old, new, head_dim_of(cfg), cfg["vocab_size"])
    state = load_state_dict(src)
    scale = math.sqrt(old.hidden / new.hidden)
    widened = {k: widen_tensor(k, t, symbols, scale) for k, t in state.items()}
    out_dtype = pick_dtype(state, widened, dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: t.to(out_dtype).contiguous() for k, t in widened.items()},
              str(out / WEIGHT_FILE), metadata={"format": "pt"})
    dtype_name = str(out_dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(widen_config(cfg, old, new, dtype_name), indent=2) + "\n")
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in SKIP_FILES:
            shutil.copy2(f, out / f.name)
    return new


def describe(name: str, old: Sizes, new: Sizes, cfg: dict) -> str:
    return (f"{name}: widened from {cfg['_src']} by zero padding: hidden {old.hidden}->{new.hidden}, "
            f"heads {old.heads}/{old.kv_heads}->{new.heads}/{new.kv_heads} (head_dim "
            f"{head_dim_of(cfg)}), intermediate {old.intermediate}->{new.intermediate}; RMSNorm "
            f"weights x sqrt({old.hidden}/{new.hidden}), eps x {old.hidden}/{new.hidden}; same "
            f"function up to float rounding; tokenizer files copied unchanged")


def write_readme(out_root: Path, lines: dict[str, str]) -> None:
    """One line per model in ``out_root/README.txt`` (lines of models not widened now are kept)."""
    path = out_root / "README.txt"
    kept = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, sep, _ = line.partition(": ")
            if sep and not line.startswith("Made by"):
                kept[name] = line
    kept.update(lines)
    header = "Made by scripts/widen_models.py (vllm-cos): widened copies of trained checkpoints.\n"
    path.write_text(header + "".join(kept[k] + "\n" for k in sorted(kept)))


# ----------------------------------------------------------------------------- the check


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype="float32").eval()


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def max_logit_diff(a, b, tok, texts=HELDOUT_TEXTS) -> float:
    import torch

    worst = 0.0
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([tok.encode(text)])
            la, lb = a(ids).logits, b(ids).logits
            worst = max(worst, (la - lb).abs().max().item())
    return worst


def greedy(model, tok, text: str, new_tokens: int) -> list[int]:
    import torch

    ids = torch.tensor([tok.encode(text)])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def decode_forward_seconds(model, context: int = 32, repeats: int = 7) -> float:
    """Best-of-``repeats`` time of one batch-1 forward of one token after ``context`` tokens."""
    import torch

    vocab = model.config.vocab_size
    ids = (torch.arange(context + 1) * 37 + 5).remainder(vocab).unsqueeze(0)
    best = math.inf
    with torch.inference_mode():
        past = model(ids[:, :context], use_cache=True).past_key_values
        model(ids[:, context:], past_key_values=past, use_cache=True)  # warm-up
        for _ in range(repeats):
            past.crop(-1)  # back to `context` tokens
            t0 = time.perf_counter()
            model(ids[:, context:], past_key_values=past, use_cache=True)
            best = min(best, time.perf_counter() - t0)
    return best


def check_model(src: Path, out: Path, tol: float, new_tokens: int, repeats: int) -> dict:
    """Equivalence of ``out`` to ``src`` (raises on failure) and both forwards' times."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    a, b = load_model(src), load_model(out)
    diff = max_logit_diff(a, b, tok)
    if not diff < tol:
        raise AssertionError(f"{out}: max |logit diff| {diff:.3g} >= tolerance {tol:g}")
    for text in HELDOUT_TEXTS:
        ga, gb = greedy(a, tok, text, new_tokens), greedy(b, tok, text, new_tokens)
        if ga != gb:
            raise AssertionError(f"{out}: greedy continuations differ on {text[:30]!r}: {ga} vs {gb}")
    t_a = decode_forward_seconds(a, repeats=repeats)
    t_b = decode_forward_seconds(b, repeats=repeats)
    return dict(params=(param_count(a), param_count(b)), diff=diff, t=(t_a, t_b))


def print_report(results: dict[str, dict]) -> None:
    print(f"{'model':10} {'params':>10} {'widened':>11} {'max|dlogit|':>12} "
          f"{'t_fwd ms':>9} {'widened':>8} {'ratio':>6}")
    for name, r in results.items():
        (pa, pb), (ta, tb) = r["params"], r["t"]
        print(f"{name:10} {pa:>10,} {pb:>11,} {r['diff']:>12.2e} {ta * 1e3:>9.2f} "
              f"{tb * 1e3:>8.2f} {tb / ta:>6.1f}")
    if "large" in results:
        for name, r in results.items():
            if name != "large":
                c_old = r["t"][0] / results["large"]["t"][0]
                c_new = r["t"][1] / results["large"]["t"][1]
                print(f"c = t({name})/t(large): original {c_old:.3f}, widened {c_new:.3f}")


# ----------------------------------------------------------------------------- CLI


def parse_factors(values: list[str]) -> tuple[float | None, dict[str, float]]:
    """``--factor F`` (all models) and ``--factor NAME=F`` (one model)."""
    default, per_model = None, {}
    for v in values:
        name, sep, f = v.rpartition("=")
        try:
            value = float(f)
        except ValueError:
            raise SystemExit(f"--factor {v!r}: expected F or NAME=F with F a number") from None
        if sep:
            per_model[name] = value
        else:
            default = value
    return default, per_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default="/work/shared/models", help="folder of model folders")
    p.add_argument("--out", default="models/wide", help="output folder (one sub-folder per model)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    p.add_argument("--factor", action="append", default=[], metavar="[NAME=]F",
                   help=f"width factor, for all models or one (defaults {DEFAULT_FACTORS})")
    p.add_argument("--size", action="append", default=[], metavar="NAME=HIDDEN,INTER[,KV]",
                   help="explicit target sizes for one model (overrides --factor)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--tol", type=float, default=1e-3, help="max |logit diff| allowed (float32)")
    p.add_argument("--new-tokens", type=int, default=24, help="greedy tokens compared per text")
    p.add_argument("--repeats", type=int, default=7, help="timed forwards (best of)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the check")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> dict[str, tuple[Sizes | None, float | None]]:
    """model name -> (explicit sizes or None, factor or None)."""
    default, per_model = parse_factors(args.factor)
    explicit = {}
    for s in args.size:
        name, sep, spec = s.partition("=")
        if not sep:
            raise SystemExit(f"--size {s!r}: expected NAME=HIDDEN,INTERMEDIATE[,KV_HEADS]")
        explicit[name] = spec
    names = [n for n in args.models.split(",") if n]
    out = {}
    for name in names:
        src = Path(args.src) / name
        old = source_sizes(read_config(src))
        if name in explicit:
            out[name] = (explicit_sizes(old, explicit[name]), None)
        else:
            factor = per_model.get(name, default if default is not None else DEFAULT_FACTORS.get(name, 4.0))
            out[name] = (None, factor)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    src_root, out_root = Path(args.src), Path(args.out)
    try:
        if not src_root.is_dir():
            raise FileNotFoundError(f"--src {src_root}: no such directory")
        todo = plan(args)
        lines = {}
        for name, (sizes, factor) in todo.items():
            cfg = read_config(src_root / name)
            new = widen_checkpoint(src_root / name, out_root / name, sizes, factor, args.dtype)
            lines[name] = describe(name, source_sizes(cfg), new, dict(cfg, _src=str(src_root / name)))
            print(lines[name], flush=True)
        write_readme(out_root, lines)
    except (FileNotFoundError, ValueError) as e:
        print(f"widen_models: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        import torch

        torch.set_num_threads(args.threads)
        results = {}
        for name in todo:
            results[name] = check_model(src_root / name, out_root / name, args.tol, args.new_tokens,
                                        args.repeats)
        print_report(results)
        print(f"check passed: max |logit diff| < {args.tol:g} (float32) and identical greedy "
              f"continuations ({args.new_tokens} tokens x {len(HELDOUT_TEXTS)} texts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
