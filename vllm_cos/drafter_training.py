"""Fine-tune a proposer (an HF Llama checkpoint) toward the collaboration's combined r.

Uses transformers and torch, nothing from vLLM.  Pipeline (``scripts/train_drafter.py`` is the
command line):

1. text: Python source files found on this machine (default: the running interpreter's standard
   library), split by file into training and held-out files (:func:`split_files`: a file is
   held out iff a hash of its last three path components falls below ``held_out``, so the split
   does not depend on which other files exist or on the seed);
2. teacher forcing: every collaborator of the cos.yaml (ORIGINAL weights, float32, frozen) runs
   once over a window of ``window`` true tokens; the rule of the config
   (:func:`vllm_cos.combine.build_combiner`) turns the stacked member logits into r at every
   position; the window is then cut into blocks of ``gamma`` consecutive positions
   (:func:`to_blocks`).  Position j of a block is conditioned on the TRUE previous tokens; in
   real decoding the drafter conditions on its own drafts, so the held-out figures are given
   both ways: teacher forced (:func:`evaluate`) and on the drafter's own drafts
   (:func:`evaluate_drafted`, :mod:`vllm_cos.drafter_blocks`: exact expected acceptance of the
   sampled paths, what the engine's verification sees);
3. the proposer's copy is trained with AdamW on :func:`vllm_cos.drafter_losses.drafter_loss`,
   on teacher-forced blocks or (``blocks="drafted"``) on blocks of its own drafts;
4. :func:`save_drafter` writes it with ``save_pretrained`` (source dtype by default) plus the
   source's tokenizer files, so vLLM can load it as a collaborator.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import shutil
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from vllm_cos.combine import build_combiner
from vllm_cos.drafter_blocks import drafted_metrics, drafted_pair, eval_contexts, path_acceptance, random_contexts
from vllm_cos.drafter_losses import acceptance_probs, drafter_loss

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "chat_template.jinja")
MAX_FILE_BYTES = 1_000_000
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BLOCKS = ("teacher", "drafted")  # training blocks: teacher forced, or the drafter's own drafts


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 200
    gamma: int = 4
    lr: float = 1e-4
    batch: int = 8  # windows per step (each gives window // gamma blocks)
    window: int = 128  # tokens per teacher-forced window
    blocks: str = "teacher"  # teacher: every gamma positions of a true window; drafted: see drafter_blocks
    context: int = 32  # drafted: true tokens before each drafted block
    divergence: str = "kl"
    positional: float | None = None  # decay of the positional weights; None: uniform
    focal: float = 0.0
    chain: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup: int = 10  # steps of linear warm-up, then cosine decay to final_lr_ratio * lr
    final_lr_ratio: float = 0.1
    seed: int = 0

    def loss_kwargs(self) -> dict:
        return dict(divergence=self.divergence, positional=self.positional, focal=self.focal, chain=self.chain)


# ---------------------------------------------------------------------------- text

def default_text_roots() -> list[Path]:
    """The running interpreter's standard library (for a venv: its base Python's)."""
    return [Path(sysconfig.get_paths()["stdlib"])]


def python_files(roots: list[Path]) -> list[Path]:
    """Every ``*.py`` under ``roots`` (files are taken as they are), at most 1 MB, sorted."""
    found: set[Path] = set()
    for root in map(Path, roots):
        if not root.exists():
            raise FileNotFoundError(f"--text: {root} does not exist")
        candidates = [root] if root.is_file() else root.rglob("*.py")
        found |= {f for f in candidates if f.is_file() and f.stat().st_size <= MAX_FILE_BYTES}
    return sorted(found)


def _file_key(path: Path) -> float:
    """A number in [0, 1) from the file's last three path components (machine-independent for
    the same library layout)."""
    digest = hashlib.sha256("/".join(path.parts[-3:]).encode()).hexdigest()
    return int(digest[:12], 16) / 16 ** 12


def split_files(files: list[Path], held_out: float = 0.05) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): a file is held out iff ``_file_key(file) < held_out``."""
    train = [f for f in files if _file_key(f) >= held_out]
    evaluation = [f for f in files if _file_key(f) < held_out]
    if not train or not evaluation:
        raise ValueError(f"--held-out {held_out}: {len(train)} training and {len(evaluation)} held-out "
                         f"files of {len(files)}; both must be non-empty (more files, or another fraction)")
    return train, evaluation


def token_windows(files: list[Path], tokenizer, window: int, max_tokens: int, seed: int) -> torch.Tensor:
    """``[N, window]`` token ids: the files in a seeded random order, each prefixed with eos (the
    document separator) and encoded without special tokens, concatenated until ``max_tokens``,
    cut into non-overlapping windows (the last partial window is dropped)."""
    order = list(files)
    random.Random(seed).shuffle(order)
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for path in order:
        if len(ids) >= max_tokens:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            ids += separator + tokenizer.encode(text, add_special_tokens=False)
    count = min(len(ids), max_tokens) // window
    if count == 0:
        raise ValueError(f"--window {window}: the text gives {len(ids)} tokens, not one window")
    return torch.tensor(ids[:count * window], dtype=torch.long).view(count, window)


# ---------------------------------------------------------------------------- models

def load_model(path: str | Path, device: str, trainable: bool = False):
    """An ``AutoModelForCausalLM`` in float32 on ``device`` (frozen and in eval mode unless
    ``trainable``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device)
    model.train(trainable)
    model.requires_grad_(trainable)
    return model


class Teacher:
    """The collaborators of a config (original weights, frozen) and their rule: r at every
    position of a batch of windows."""

    def __init__(self, cfg, device: str):
        self.members = [load_model(m.path, device) for m in cfg.models]
        self.combiner = build_combiner(cfg.rule, cfg.model_names)
        self.device = device

    @torch.no_grad()
    def combined_probs(self, input_ids: torch.Tensor) -> torch.Tensor:  # [N, W] -> [N, W, V]
        input_ids = input_ids.to(self.device)
        member_logits = torch.stack([m(input_ids).logits.float() for m in self.members])  # [M, N, W, V]
        num_models, num_windows, window, vocab = member_logits.shape
        combined_logits = self.combiner(member_logits.view(num_models, num_windows * window, vocab))
        return torch.softmax(combined_logits, dim=-1).view(num_windows, window, vocab)


def to_blocks(per_position: torch.Tensor, gamma: int) -> torch.Tensor:
    """``[N, W, V]`` -> ``[N * (W // gamma), gamma, V]``: consecutive gamma-position blocks of
    every window (a last partial block is dropped)."""
    num_windows, window, vocab = per_position.shape
    usable = window // gamma * gamma
    return per_position[:, :usable].reshape(num_windows * (window // gamma), gamma, vocab)


def block_pair(drafter, teacher: Teacher, input_ids: torch.Tensor, gamma: int):
    """(draft_logits, combined_probs), both ``[B, gamma, V]``, for a batch of windows."""
    combined_probs = teacher.combined_probs(input_ids)  # [N, W, V]
    draft_logits = drafter(input_ids.to(teacher.device)).logits.float()  # [N, W, V]
    if draft_logits.shape != combined_probs.shape:
        raise ValueError(f"--proposer: vocabulary {draft_logits.shape[-1]} differs from the collaborators' "
                         f"{combined_probs.shape[-1]}")
    return to_blocks(draft_logits, gamma), to_blocks(combined_probs, gamma)


# ---------------------------------------------------------------------------- training / evaluation

def lr_factor(step: int, settings: TrainSettings) -> float:
    """Multiplier of ``settings.lr`` at 0-based ``step``: linear warm-up over ``warmup`` steps,
    then cosine decay to ``final_lr_ratio`` at the last step."""
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup - 1)
    return settings.final_lr_ratio + (1 - settings.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_drafter(drafter, teacher: Teacher, train_windows: torch.Tensor, settings: TrainSettings,
                  log: Callable[[str], None] = print, log_every: int = 20) -> list[dict]:
    """AdamW (schedule :func:`lr_factor`, gradient norm clipped to ``grad_clip``) for
    ``settings.steps`` steps on batches of windows drawn (seeded, without replacement until the
    pool is used up) from ``train_windows`` ``[N, W]``; returns the
    per-step parts of the loss (``loss`` added)."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, settings))
    drafter.train()
    order = torch.empty(0, dtype=torch.long)
    history = []
    for step in range(settings.steps):
        if len(order) < settings.batch:
            order = torch.cat([order, torch.randperm(len(train_windows), generator=generator)])
        batch_ids, order = train_windows[order[:settings.batch]], order[settings.batch:]
        if settings.blocks == "drafted":  # as many blocks per step as eval_contexts gives from batch windows
            rows = settings.batch * ((settings.window - settings.context) // settings.gamma)
            contexts = random_contexts(train_windows, rows, settings.context, generator)
            draft_logits, combined_probs, _ = drafted_pair(drafter, teacher, contexts, settings.gamma, generator)
        else:
            draft_logits, combined_probs = block_pair(drafter, teacher, batch_ids, settings.gamma)
        loss, parts = drafter_loss(draft_logits, combined_probs, **settings.loss_kwargs())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), settings.grad_clip)
        optimizer.step()
        schedule.step()
        history.append({"step": step + 1, "loss": float(loss.detach()), **parts})
        if log_every and ((step + 1) % log_every == 0 or step == 0):
            log(f"step {step + 1:5d}  loss {float(loss.detach()):.4f}  distill {parts['distill']:.4f}  "
                f"alpha {parts['acceptance']:.4f}  accepted {parts['accepted_length']:.4f}")
    drafter.eval()
    return history


@torch.no_grad()
def evaluate(drafter, teacher: Teacher, windows: torch.Tensor, settings: TrainSettings, batch: int = 8) -> dict:
    """Teacher-forced acceptance on ``windows`` ``[N, W]``: ``acceptance`` = alpha_j per block
    position j = 1..gamma (mean over blocks), ``accepted_length`` = mean over blocks of
    ``sum_j prod_{i<=j} alpha_i`` (draft tokens only; the bonus token is not counted),
    ``loss`` = the settings' drafter loss (mean over batches, weighted by blocks)."""
    was_training = drafter.training
    drafter.eval()
    alpha_sum = torch.zeros(settings.gamma, dtype=torch.float64)
    length_sum = loss_sum = 0.0
    blocks = 0
    for start in range(0, len(windows), batch):
        draft_logits, combined_probs = block_pair(drafter, teacher, windows[start:start + batch], settings.gamma)
        alpha = acceptance_probs(torch.softmax(draft_logits, dim=-1), combined_probs).double().cpu()  # [B, gamma]
        loss, _ = drafter_loss(draft_logits, combined_probs, **settings.loss_kwargs())
        alpha_sum += alpha.sum(dim=0)
        length_sum += float(torch.cumprod(alpha, dim=-1).sum())
        loss_sum += float(loss) * len(alpha)
        blocks += len(alpha)
    drafter.train(was_training)
    return {"acceptance": (alpha_sum / blocks).tolist(), "accepted_length": length_sum / blocks,
            "loss": loss_sum / blocks, "blocks": blocks}


@torch.no_grad()
def evaluate_drafted(drafter, teacher: Teacher, windows: torch.Tensor, settings: TrainSettings,
                     batch: int = 32) -> dict:
    """Acceptance of the drafter's own drafts (:mod:`vllm_cos.drafter_blocks`) after every
    ``context + gamma`` chunk start of ``windows``; seeded by ``settings.seed``."""
    was_training = drafter.training
    drafter.eval()
    generator = torch.Generator().manual_seed(settings.seed + 1)
    contexts = eval_contexts(windows, settings.context, settings.gamma)
    survival_sum = torch.zeros(settings.gamma, dtype=torch.float64)
    for start in range(0, len(contexts), batch):
        draft_logits, combined_probs, drafts = drafted_pair(drafter, teacher, contexts[start:start + batch],
                                                            settings.gamma, generator)
        accept = path_acceptance(torch.softmax(draft_logits, dim=-1), combined_probs, drafts).double().cpu()
        survival_sum += torch.cumprod(accept, dim=-1).sum(dim=0)
    drafter.train(was_training)
    return drafted_metrics(survival_sum, len(contexts))


# ---------------------------------------------------------------------------- checkpoint

def source_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype recorded in a checkpoint's config.json (``dtype`` or ``torch_dtype``), default float32."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(str(name).replace("torch.", ""), torch.float32)


def save_drafter(drafter, source_dir: str | Path, out_dir: str | Path, dtype: str = "source",
                 meta: dict | None = None) -> Path:
    """Write the drafter with ``save_pretrained`` (``dtype``: ``source`` = the source checkpoint's
    dtype, or float32 / float16 / bfloat16) and copy the source's tokenizer files;
    ``meta`` goes to ``drafter_training.json``."""
    if dtype != "source" and dtype not in DTYPES:
        raise ValueError(f"--save-dtype: must be 'source' or one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = source_dtype(source_dir) if dtype == "source" else DTYPES[dtype]
    copy.deepcopy(drafter).to("cpu", target).save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, out / name)
    if meta is not None:
        (out / "drafter_training.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out


# ---------------------------------------------------------------------------- one call

def prepare_text(tokenizer, settings: TrainSettings, roots: list[Path] | None = None, held_out: float = 0.05,
                 train_tokens: int = 200_000, eval_tokens: int = 20_000) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows, held-out windows), each ``[N, window]``, from disjoint files."""
    train_files, held_out_files = split_files(python_files(roots or default_text_roots()), held_out)
    train = token_windows(train_files, tokenizer, settings.window, train_tokens, settings.seed)
    evaluation = token_windows(held_out_files, tokenizer, settings.window, eval_tokens, settings.seed)
    return train, evaluation


def run(cfg, proposer: str, out_dir: str | Path | None, settings: TrainSettings, *, init: str | Path | None = None,
        device: str = "cpu", text: dict | None = None, eval_only: bool = False, save_dtype: str = "source",
        log: Callable[[str], None] = print) -> dict:
    """Train (unless ``eval_only``) the collaborator ``proposer`` of ``cfg`` (its weights from
    ``init``, default its own path) and evaluate before and after; ``text``: keyword arguments of
    :func:`prepare_text`.  Returns {"before", "after", "history", "settings", ...}."""
    from transformers import AutoTokenizer

    if proposer not in cfg.model_names:
        raise ValueError(f"--proposer: {proposer!r} is not a collaborator of the config {cfg.model_names}")
    source_dir = cfg.models[cfg.index(proposer)].path
    init_dir = str(init or source_dir)
    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    train_windows, eval_windows = prepare_text(tokenizer, settings, **(text or {}))
    teacher = Teacher(cfg, device)
    drafter = load_model(init_dir, device, trainable=not eval_only)
    result = {"settings": asdict(settings), "proposer": proposer, "init": init_dir, "rule": cfg.rule.name,
              "train_windows": len(train_windows), "eval_windows": len(eval_windows)}
    result["before"] = evaluate(drafter, teacher, eval_windows, settings)
    result["before_drafted"] = evaluate_drafted(drafter, teacher, eval_windows, settings)
    log(f"held-out before: {_summary(result['before'])}")
    log(f"  own drafts:    {_summary(result['before_drafted'])}")
    if eval_only:
        return result
    result["history"] = train_drafter(drafter, teacher, train_windows, settings, log=log)
    result["after"] = evaluate(drafter, teacher, eval_windows, settings)
    result["after_drafted"] = evaluate_drafted(drafter, teacher, eval_windows, settings)
    log(f"held-out after:  {_summary(result['after'])}")
    log(f"  own drafts:    {_summary(result['after_drafted'])}")
    if out_dir is not None:
        meta = {k: v for k, v in result.items() if k != "history"}
        result["out"] = str(save_drafter(drafter, source_dir, out_dir, save_dtype, meta=meta))
    return result


def _summary(metrics: dict) -> str:
    alphas = " ".join(f"{a:.4f}" for a in metrics["acceptance"])
    loss = f"loss {metrics['loss']:.4f}  " if "loss" in metrics else ""
    return f"{loss}alpha_j [{alphas}]  accepted length {metrics['accepted_length']:.4f}"
