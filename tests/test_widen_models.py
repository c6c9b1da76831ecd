"""scripts/widen_models.py: widened checkpoints compute the same function (fast, no engine)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # max |logit difference| in float32 (measured ~1e-5 on the shared models)


@pytest.fixture(scope="module")
def widen():
    spec = importlib.util.spec_from_file_location("widen_models", REPO_ROOT / "scripts" / "widen_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["widen_models"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _assert_same_function(widen, src: Path, out: Path) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    a, b = widen.load_model(src), widen.load_model(out)
    diff = widen.max_logit_diff(a, b, tok)
    assert diff < TOL, f"{out.name}: max |logit diff| {diff}"
    text = widen.HELDOUT_TEXTS[0]
    assert widen.greedy(a, tok, text, 8) == widen.greedy(b, tok, text, 8)
    return diff


def test_widened_tiny_models_match(widen, tiny_models, tmp_path):
    for name, src in tiny_models.items():
        out = tmp_path / name
        widen.widen_checkpoint(src, out, factor=2.0)
        old, new = (json.loads((d / "config.json").read_text()) for d in (src, out))
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
            assert new[key] == 2 * old[key], key
        assert new["head_dim"] == old.get("head_dim", old["hidden_size"] // old["num_attention_heads"])
        assert new["rms_norm_eps"] == pytest.approx(old["rms_norm_eps"] / 2)
        assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
        _assert_same_function(widen, src, out)


def test_biases_tied_embeddings_and_explicit_sizes(widen, tiny_models, tmp_path):
    """A Llama with attention/MLP biases and tied embeddings, widened to explicit sizes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, attention_bias=True,
                      mlp_bias=True, tie_word_embeddings=True, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    src = tmp_path / "biased"
    model.save_pretrained(str(src))
    AutoTokenizer.from_pretrained(str(tiny_models["small"])).save_pretrained(str(src))
    widen.widen_checkpoint(src, tmp_path / "wide", new=widen.Sizes(384, 512, 6, 3))
    new = json.loads((tmp_path / "wide" / "config.json").read_text())
    assert (new["hidden_size"], new["num_attention_heads"], new["num_key_value_heads"]) == (384, 6, 3)
    assert new["tie_word_embeddings"] is True
    _assert_same_function(widen, src, tmp_path / "wide")


def test_bad_arguments(widen, tmp_path, capsys):
    assert widen.main(["--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such directory" in err
    with pytest.raises(ValueError, match="group ratio"):
        widen.validate_sizes(widen.Sizes(128, 256, 2, 1), widen.Sizes(256, 512, 3, 2))
    with pytest.raises(ValueError, match="shrink"):
        widen.scaled_sizes(widen.Sizes(128, 256, 2, 1), 0.5)
    with pytest.raises(ValueError, match="multiple"):
        widen.validate_sizes(widen.Sizes(128, 256, 2, 1), widen.Sizes(320, 512, 6, 3))
