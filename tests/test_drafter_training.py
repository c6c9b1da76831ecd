"""vllm_cos.drafter_training on the tiny models: a short run improves the proposer toward r, the
checkpoint loads with transformers, the file split holds files out; no vLLM engine."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from vllm_cos.config import load_config
from vllm_cos.drafter_training import (TrainSettings, default_text_roots, lr_factor, python_files, run,
                                       split_files, to_blocks, token_windows)

MODULE = Path(__file__).resolve().parents[1] / "vllm_cos" / "drafter_training.py"


def tiny_config(tiny_models: dict[str, Path], tmp_path: Path, rule: dict):
    path = tmp_path / "cos.yaml"
    path.write_text(json.dumps({
        "models": [{"name": "large", "path": str(tiny_models["large"]), "gamma": 0},
                   {"name": "small", "path": str(tiny_models["small"]), "gamma": 3}],
        "target": "large", "rule": rule, "schedule": "naive", "proposer": "small"}))
    return load_config(path)


def test_training_improves_the_proposer_and_writes_a_loadable_checkpoint(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    cfg = tiny_config(tiny_models, tmp_path, {"name": "weighted_ensemble", "weights": {"large": 0.5, "small": 0.5}})
    settings = TrainSettings(steps=30, gamma=3, lr=3e-3, batch=4, window=48, divergence="kl", positional=0.8,
                             focal=0.5, chain=0.5, seed=0)
    text = {"train_tokens": 6000, "eval_tokens": 1500}
    out = tmp_path / "drafter"
    result = run(cfg, "small", out, settings, text=text, log=lambda line: None)
    before, after = result["before"], result["after"]
    assert after["loss"] < before["loss"] - 0.02
    assert after["accepted_length"] > before["accepted_length"]
    assert len(after["acceptance"]) == 3 and all(0 < a < 1 for a in after["acceptance"])
    history = result["history"]
    assert len(history) == 30
    assert sum(h["loss"] for h in history[-5:]) / 5 < sum(h["loss"] for h in history[:5]) / 5

    source = AutoModelForCausalLM.from_pretrained(str(tiny_models["small"]))
    trained = AutoModelForCausalLM.from_pretrained(str(out))
    shapes = {k: v.shape for k, v in source.state_dict().items()}
    assert {k: v.shape for k, v in trained.state_dict().items()} == shapes
    assert trained.dtype == source.dtype  # the source's dtype (float32 for the tiny models)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, source.state_dict()[k])]
    assert changed
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 512
    assert (out / "tokenizer.json").read_bytes() == (tiny_models["small"] / "tokenizer.json").read_bytes()
    assert AutoTokenizer.from_pretrained(str(out)).encode("def f():") == \
        AutoTokenizer.from_pretrained(str(tiny_models["small"])).encode("def f():")
    meta = json.loads((out / "drafter_training.json").read_text())
    assert meta["after"] == after and meta["settings"]["gamma"] == 3

    # Evaluating the written checkpoint reproduces the "after" figures (same held-out windows).
    again = run(cfg, "small", None, settings, init=out, text=text, eval_only=True, log=lambda line: None)
    assert again["before"]["accepted_length"] == pytest.approx(after["accepted_length"], abs=1e-4)


def test_training_on_own_drafts_raises_their_acceptance(tiny_models, tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_config(tiny_models, tmp_path, {"name": "weighted_ensemble", "weights": {"large": 0.5, "small": 0.5}})
    settings = TrainSettings(steps=30, gamma=3, lr=3e-3, batch=4, window=48, context=12, blocks="drafted",
                             divergence="tv", chain=0.5, seed=0)
    result = run(cfg, "small", None, settings, text={"train_tokens": 6000, "eval_tokens": 1500},
                 log=lambda line: None)
    before, after = result["before_drafted"], result["after_drafted"]
    assert before["blocks"] == after["blocks"] == 31 * 12  # 1500 tokens = 31 windows, (48 - 12) // 3 blocks each
    assert after["accepted_length"] > before["accepted_length"] + 0.05
    assert all(0 < a < 1 for a in after["acceptance"])


def test_contrastive_rule_and_errors_name_the_flag(tiny_models, tmp_path):
    cfg = tiny_config(tiny_models, tmp_path, {"name": "contrastive", "expert": "large", "amateur": "small", "mu": 0.1})
    settings = TrainSettings(steps=1, gamma=2, batch=2, window=16, context=8)
    result = run(cfg, "small", None, settings, text={"train_tokens": 64, "eval_tokens": 64}, eval_only=True,
                 log=lambda line: None)
    assert result["rule"] == "contrastive" and len(result["before"]["acceptance"]) == 2
    assert result["before"]["blocks"] == 4 * 8  # 64 tokens = 4 windows of 16 = 8 blocks of 2 each
    assert result["before_drafted"]["blocks"] == 4 * 4  # (16 - 8) // 2 drafted blocks per window
    with pytest.raises(ValueError, match="--proposer"):
        run(cfg, "medium", None, settings, eval_only=True)


def test_file_split_is_deterministic_and_disjoint():
    files = python_files(default_text_roots())
    train, held_out = split_files(files, 0.05)
    assert set(train).isdisjoint(held_out) and len(train) + len(held_out) == len(files)
    assert 0.02 < len(held_out) / len(files) < 0.1
    assert split_files(files, 0.05) == (train, held_out)
    # A file's side does not depend on the other files.
    _, half_held = split_files(files[::2], 0.05)
    assert set(half_held) == set(held_out) & set(files[::2])
    with pytest.raises(ValueError, match="--held-out"):
        split_files(files[:1], 0.05)
    with pytest.raises(FileNotFoundError, match="--text"):
        python_files([Path("/nonexistent/dir")])


def test_windows_blocks_and_schedule(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["small"]))
    files = python_files(default_text_roots())[:50]
    windows = token_windows(files, tokenizer, 10, 95, seed=0)
    assert windows.shape == (9, 10) and windows[0, 0] == tokenizer.eos_token_id
    assert torch.equal(windows, token_windows(files, tokenizer, 10, 95, seed=0))
    per_position = torch.arange(2 * 7 * 1).view(2, 7, 1)  # window 7, gamma 3 -> 2 blocks per window
    blocks = to_blocks(per_position, 3)
    assert blocks.shape == (4, 3, 1) and blocks[:, :, 0].tolist() == [[0, 1, 2], [3, 4, 5], [7, 8, 9], [10, 11, 12]]
    settings = TrainSettings(steps=20, warmup=4, lr=1.0, final_lr_ratio=0.1)
    factors = [lr_factor(step, settings) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))


def test_training_module_imports_no_vllm():
    names = set()
    for node in ast.walk(ast.parse(MODULE.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    bad = {n for n in names if n == "vllm" or n.startswith(("vllm.", "vllm_cos.adapters", "vllm_cos.engine"))}
    assert not bad, bad
