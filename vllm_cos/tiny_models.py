"""Tiny, locally built Llama checkpoints for tests, demos and CPU benchmarks.

``build_tiny_models(out_dir)`` produces three Hugging Face ``LlamaForCausalLM`` checkpoints
("large" > "medium" > "small" in parameters) that share ONE byte-level BPE tokenizer, with no
downloads: the tokenizer and the models are trained for a few seconds on source files of the
Python standard library that runs this code.

Properties the rest of the project relies on (``tests/test_tiny_models.py`` checks them):

- every model dir loads offline with ``AutoTokenizer`` / ``AutoModelForCausalLM`` and in vLLM;
  identical ``tokenizer.json`` in every dir; bos ``<s>`` = 0, eos = pad ``</s>`` = 1;
- head_dim is exactly 64 for every model (a head size vLLM's CPU attention supports);
- next-token distributions are peaked (greedy is unambiguous) and the models agree often but
  not always (speculative acceptance, 1 - total variation, between the sizes is well inside
  (0.3, 0.9));
- deterministic for a given machine/Python: fixed seeds, fixed corpus files, fixed recipe;
- cached: ``out_dir/build_spec.json`` records a hash of the recipe and of the corpus; if it matches
  and every model dir is complete, nothing is rebuilt or rewritten;
- a chat template (:data:`CHAT_TEMPLATE`, plain ``role: content`` lines) in every
  ``tokenizer_config.json`` and as ``out_dir/chat_template.jinja`` (for ``--chat-template`` with
  other models), so ``/v1/chat/completions`` works; written on every call when missing or
  different (a cache built before templates gets one), never rewritten when equal.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

BUILD_VERSION = 3
MARKER = "build_spec.json"
MODEL_NAMES = ("large", "medium", "small")
BOS, EOS = "<s>", "</s>"

# Files of the running interpreter's standard library (present in CPython >= 3.10).
TRAIN_FILES = (
    "argparse.py", "dataclasses.py", "functools.py", "inspect.py", "pathlib.py",
    "typing.py", "string.py", "random.py", "shutil.py", "collections/__init__.py",
    "json/decoder.py", "json/encoder.py", "enum.py", "tokenize.py", "ast.py",
    "contextlib.py", "fractions.py", "statistics.py", "difflib.py", "pprint.py",
)
HELDOUT_FILES = ("textwrap.py", "heapq.py", "queue.py", "calendar.py")

VOCAB_SIZE = 512
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
HEAD_DIM = 64

# Architecture of each model. head_dim = hidden_size / num_attention_heads = 64 everywhere.
MODEL_SPECS = {
    "large": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, intermediate_size=512, seed=1000),
    "medium": dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                   num_hidden_layers=3, intermediate_size=384, seed=2000),
    "small": dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                  num_hidden_layers=2, intermediate_size=384, seed=3000),
}

TRAIN_SPEC = dict(
    steps=150, batch_size=8, seq_len=64, lr=3e-3, warmup=10, weight_decay=0.01,
    # Embeddings and lm_head start from a rank-`hidden_size` SVD of the corpus's (smoothed)
    # bigram log-probabilities, so a few seconds of training start at bigram quality.
    bigram_smoothing=0.05, residual_init_scale=0.1,
    # After training, lm_head is multiplied by this (= sampling at temperature 1/scale): makes
    # the distributions more peaked without changing any argmax.
    logit_scale=2.0,
    # Build single-threaded: tiny matmuls gain little from threads, a busy machine loses a lot,
    # and results then do not depend on the core count.
    threads=1,
)


# --------------------------------------------------------------------------------------------
# corpus and tokenizer


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read_files(names) -> list[str]:
    root = _stdlib_dir()
    texts = []
    for name in names:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"tiny-model corpus file missing from the stdlib: {path}")
        texts.append(path.read_text(encoding="utf-8"))
    return texts


def train_corpus() -> list[str]:
    return _read_files(TRAIN_FILES)


def heldout_text() -> str:
    """Text the models never trained on (for measuring entropy/margin/agreement)."""
    return "\n".join(_read_files(HELDOUT_FILES))


def spec_hash() -> str:
    """Hash of everything that determines the build: recipe, versions, corpus bytes."""
    h = hashlib.sha256()
    spec = dict(version=BUILD_VERSION, vocab=VOCAB_SIZE, models=MODEL_SPECS, train=TRAIN_SPEC,
                files=TRAIN_FILES)
    h.update(json.dumps(spec, sort_keys=True).encode())
    for text in train_corpus():
        h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()


def build_tokenizer():
    """Byte-level BPE (vocab 512) trained on the corpus; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_corpus(), trainer=trainer)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=None,
        model_max_length=1024, clean_up_tokenization_spaces=False,
    )


def _encode(tokenizer, text: str) -> list[int]:
    # the backend tokenizer directly: no "sequence longer than model_max_length" warning
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def _token_stream(tokenizer, texts):
    import torch

    ids: list[int] = []
    for text in texts:
        ids.append(0)  # <s>
        ids.extend(_encode(tokenizer, text))
        ids.append(1)  # </s>
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# models


def _llama_config(name: str):
    from transformers import LlamaConfig

    s = MODEL_SPECS[name]
    assert s["hidden_size"] // s["num_attention_heads"] == HEAD_DIM
    assert s["num_attention_heads"] % s["num_key_value_heads"] == 0
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"],
        head_dim=HEAD_DIM,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        torch_dtype="float32",
    )


def _bigram_svd(stream):
    """SVD of the row-centred log-probability matrix of the corpus's bigrams."""
    import torch

    counts = torch.zeros(VOCAB_SIZE, VOCAB_SIZE, dtype=torch.float64)
    counts.index_put_((stream[:-1], stream[1:]), torch.ones(len(stream) - 1, dtype=torch.float64),
                      accumulate=True)
    counts += TRAIN_SPEC["bigram_smoothing"]
    logp = counts.log() - counts.sum(1, keepdim=True).log()
    u, s, vh = torch.linalg.svd(logp - logp.mean(1, keepdim=True))
    return u, s, vh


def _warm_start(model, svd):
    """Embeddings/lm_head = rank-h factors of the bigram logits; residual branches damped."""
    import torch

    u, s, vh = svd
    h = model.config.hidden_size
    emb = (u[:, :h] * s[:h].sqrt()).float()
    head = (vh[:h].T * s[:h].sqrt()).float()
    rms = emb.pow(2).mean(1).sqrt().mean()
    with torch.no_grad():
        # final RMSNorm divides by ~rms: scale so that logits ~ emb @ head.T for a typical row
        model.model.embed_tokens.weight.copy_(emb / rms)
        model.lm_head.weight.copy_(head * rms)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(TRAIN_SPEC["residual_init_scale"])
            layer.mlp.down_proj.weight.mul_(TRAIN_SPEC["residual_init_scale"])


def _train_model(name: str, stream, svd, log=print):
    import torch
    from transformers import LlamaForCausalLM

    spec, tr = MODEL_SPECS[name], TRAIN_SPEC
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(_llama_config(name))
    _warm_start(model, svd)
    model.train()
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=tr["lr"], betas=(0.9, 0.95),
                            weight_decay=tr["weight_decay"])
    steps, L, B = tr["steps"], tr["seq_len"], tr["batch_size"]

    def lr_at(step):
        if step < tr["warmup"]:
            return (step + 1) / tr["warmup"]
        frac = (step - tr["warmup"]) / max(1, steps - tr["warmup"])
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - L - 1, (B,), generator=gen)
        batch = torch.stack([stream[s: s + L + 1] for s in starts.tolist()])
        batch[:, 0] = 0  # every training window starts with <s>, as prompts do
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE),
                                                 batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 40 == 0 or step == steps - 1:
            log(f"  [{name}] step {step:4d} loss {loss.item():.3f} "
                f"({time.perf_counter() - t0:.1f}s)")
    model.eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(tr["logit_scale"])
    return model


def _portable_tokenizer_config(model_dir: Path) -> None:
    # transformers 5 writes its own class name ("TokenizersBackend"); the 4.x name loads the
    # same tokenizer.json in both major versions.
    path = model_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)  # readers see the old or the new file, never half of one


def ensure_chat_template(out_dir: str | Path, names=MODEL_NAMES) -> Path:
    """Put :data:`CHAT_TEMPLATE` into each model's tokenizer config and ``out_dir/chat_template.jinja``
    (idempotent: files that already hold it are not touched).  Returns the template file."""
    out_dir = Path(out_dir)
    for name in names:
        path = out_dir / name / "tokenizer_config.json"
        cfg = json.loads(path.read_text())
        if cfg.get("chat_template") != CHAT_TEMPLATE:
            cfg["chat_template"] = CHAT_TEMPLATE
            _write_if_changed(path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    template = out_dir / CHAT_TEMPLATE_FILE
    _write_if_changed(template, CHAT_TEMPLATE + "\n")
    return template


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _complete(out_dir: Path) -> bool:
    needed = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json")
    return all((out_dir / n / f).is_file() for n in MODEL_NAMES for f in needed)


def _cached(out_dir: Path, digest: str) -> bool:
    marker = out_dir / MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return data.get("spec_hash") == digest and _complete(out_dir)


@contextlib.contextmanager
def _lock(out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_tiny_models(out_dir: str | Path = "models/tiny", force: bool = False,
                      verbose: bool = False) -> dict[str, Path]:
    """Build (or reuse) the three tiny models; returns {"large"|"medium"|"small": model dir}."""
    out_dir = Path(out_dir).resolve()
    paths = {n: out_dir / n for n in MODEL_NAMES}
    log = print if verbose else (lambda *a, **k: None)
    digest = spec_hash()
    if not force and _cached(out_dir, digest):
        log(f"tiny models up to date in {out_dir} (spec {digest[:12]})")
        ensure_chat_template(out_dir)
        return paths
    with _lock(out_dir), _torch_threads(TRAIN_SPEC["threads"]):
        if not force and _cached(out_dir, digest):  # built by a concurrent caller
            ensure_chat_template(out_dir)
            return paths
        import torch
        from transformers import GenerationConfig

        t0 = time.perf_counter()
        (out_dir / MARKER).unlink(missing_ok=True)
        for stale in out_dir.glob(".build-*"):  # left by an interrupted build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tokenizer = build_tokenizer()
        stream = _token_stream(tokenizer, train_corpus())
        svd = _bigram_svd(stream)
        log(f"tokenizer: vocab {len(tokenizer)}, corpus {len(stream)} tokens "
            f"({time.perf_counter() - t0:.1f}s)")
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir))
        try:
            for name in MODEL_NAMES:
                model = _train_model(name, stream, svd, log=log)
                d = tmp / name
                model.save_pretrained(d, safe_serialization=True)
                GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                 do_sample=False).save_pretrained(d)
                tokenizer.save_pretrained(d)
                _portable_tokenizer_config(d)
                for f in d.iterdir():
                    f.chmod(0o644)
            for name, final in paths.items():
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp / name, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        info = dict(spec_hash=digest, build_version=BUILD_VERSION, torch=torch.__version__,
                    build_seconds=round(time.perf_counter() - t0, 2),
                    models={n: str(p.relative_to(out_dir)) for n, p in paths.items()})
        ensure_chat_template(out_dir)
        (out_dir / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        log(f"built tiny models in {out_dir} in {info['build_seconds']}s")
    return paths


# --------------------------------------------------------------------------------------------
# measurements


def measure_models(paths: dict[str, Path], text: str | None = None,
                   max_tokens: int = 1024) -> dict:
    """Per model: params, mean entropy, mean top1-top2 logit margin, fraction of positions with
    margin > 0.05; pairwise mean (1 - TV) of the T=1 next-token distributions. Uses held-out text
    (chunks of 128 tokens, each starting with <s>)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = heldout_text() if text is None else text
    tok = AutoTokenizer.from_pretrained(paths["large"])
    ids = _encode(tok, text)[:max_tokens]
    chunk = 127
    n = len(ids) // chunk
    batch = torch.tensor([[0] + ids[i * chunk:(i + 1) * chunk] for i in range(n)])
    probs, out = {}, {"models": {}, "agreement": {}}
    with torch.no_grad():
        for name, path in paths.items():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            logits = model(input_ids=batch).logits.reshape(-1, model.config.vocab_size)
            p = logits.softmax(-1)
            top2 = logits.topk(2, dim=-1).values
            margin = top2[:, 0] - top2[:, 1]
            ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
            probs[name] = p
            out["models"][name] = dict(
                params=sum(x.numel() for x in model.parameters()),
                entropy=ent.mean().item(),
                max_entropy=math.log(model.config.vocab_size),
                margin=margin.mean().item(),
                margin_median=margin.median().item(),
                frac_margin_gt_0_05=(margin > 0.05).float().mean().item(),
                top1_prob=p.max(-1).values.mean().item(),
            )
    names = list(paths)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            tv = 0.5 * (probs[a] - probs[b]).abs().sum(-1)
            same_argmax = (probs[a].argmax(-1) == probs[b].argmax(-1)).float().mean().item()
            out["agreement"][f"{a}-{b}"] = dict(one_minus_tv=(1 - tv).mean().item(),
                                                greedy_agree=same_argmax)
    return out


def format_measurements(m: dict) -> str:
    lines = [f"{'model':8s} {'params':>9s} {'entropy':>8s} {'margin':>7s} {'m>0.05':>7s} "
             f"{'top1 p':>7s}"]
    for name, s in m["models"].items():
        lines.append(f"{name:8s} {s['params']:9,d} {s['entropy']:8.3f} {s['margin']:7.3f} "
                     f"{s['frac_margin_gt_0_05']:7.3f} {s['top1_prob']:7.3f}")
    some = next(iter(m["models"].values()))
    lines.append(f"(entropy of uniform over the vocab: {some['max_entropy']:.3f})")
    for pair, a in m["agreement"].items():
        lines.append(f"{pair:14s} 1-TV {a['one_minus_tv']:.3f}  greedy agree "
                     f"{a['greedy_agree']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/tiny", help="output dir (default: models/tiny)")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--measure", action="store_true",
                    help="print params/entropy/margin/agreement on held-out text")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    paths = build_tiny_models(args.out, force=args.force, verbose=True)
    print(f"done in {time.perf_counter() - t0:.1f}s: "
          + ", ".join(f"{n}={p}" for n, p in paths.items()))
    if args.measure:
        print(format_measurements(measure_models(paths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
