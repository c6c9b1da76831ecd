"""The tiny shared-tokenizer models: shape, tokenizer, peakedness, agreement, caching, determinism.

Everything here reads the cached models (``tiny_models`` fixture) except the determinism checks,
which retrain briefly; the full bit-for-bit rebuild runs only with ``VLLM_COS_FULL_REBUILD=1``.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors import safe_open

from vllm_cos import tiny_models as tm

NAMES = ("large", "medium", "small")


def _params(path) -> int:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _files_state(paths) -> dict:
    return {str(f): (f.stat().st_mtime_ns, f.stat().st_size)
            for p in paths.values() for f in sorted(p.iterdir())}


@pytest.fixture(scope="module")
def measured(tiny_models):
    m = tm.measure_models(tiny_models)
    print("\n" + tm.format_measurements(m))
    return m


def test_paths_and_files(tiny_models):
    assert set(tiny_models) == set(NAMES)
    for name, path in tiny_models.items():
        assert path.name == name and path.is_dir()
        for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json"):
            assert (path / f).is_file(), f"{name}/{f}"


def test_shared_tokenizer(tiny_models):
    from transformers import AutoTokenizer

    raw = {n: (p / "tokenizer.json").read_bytes() for n, p in tiny_models.items()}
    assert len(set(raw.values())) == 1, "tokenizer.json differs between models"
    toks = {n: AutoTokenizer.from_pretrained(p) for n, p in tiny_models.items()}
    vocab = toks["large"].get_vocab()
    assert len(vocab) == tm.VOCAB_SIZE
    for n, tok in toks.items():
        assert tok.get_vocab() == vocab, n
        assert (tok.bos_token, tok.bos_token_id) == ("<s>", 0)
        assert (tok.eos_token, tok.eos_token_id) == ("</s>", 1)
        assert tok.pad_token_id == 1
    text = "def f(x):\n    return {'a': x + 1}  # ünïcode\n"
    ids = toks["large"](text)["input_ids"]
    assert ids[0] == 0 and toks["large"].decode(ids, skip_special_tokens=True) == text


def test_configs(tiny_models):
    from transformers import AutoConfig, GenerationConfig

    for name, path in tiny_models.items():
        cfg = AutoConfig.from_pretrained(path)
        assert cfg.architectures == ["LlamaForCausalLM"]
        assert cfg.hidden_size // cfg.num_attention_heads == 64 == cfg.head_dim, name
        assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
        assert cfg.vocab_size == tm.VOCAB_SIZE
        assert cfg.max_position_embeddings == 1024
        assert (cfg.bos_token_id, cfg.eos_token_id) == (0, 1)
        assert GenerationConfig.from_pretrained(path).eos_token_id == 1
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_sizes_ordered(tiny_models):
    p = {n: _params(path) for n, path in tiny_models.items()}
    assert p["large"] > p["medium"] > p["small"], p


def test_peaked(measured):
    for name, s in measured["models"].items():
        # greedy decoding is unambiguous and the distributions are far from uniform
        assert s["frac_margin_gt_0_05"] > 0.8, (name, s)
        assert s["entropy"] < 0.6 * s["max_entropy"], (name, s)
        assert s["top1_prob"] > 0.25, (name, s)


def test_related_but_different(measured):
    for pair, a in measured["agreement"].items():
        # acceptance rate of one model's samples under another's, at T = 1
        assert 0.3 < a["one_minus_tv"] < 0.9, (pair, a)
        assert 0.2 < a["greedy_agree"] < 0.95, (pair, a)


def test_rebuild_is_cached(tiny_models):
    before = _files_state(tiny_models)
    marker = tiny_models["large"].parent / tm.MARKER
    marker_mtime = marker.stat().st_mtime_ns
    again = tm.build_tiny_models(tiny_models["large"].parent)
    assert again == tiny_models
    assert _files_state(again) == before
    assert marker.stat().st_mtime_ns == marker_mtime


def test_tokenizer_deterministic(tiny_models):
    # retraining the tokenizer here reproduces the cached one (built in another process)
    fresh = json.loads(tm.build_tokenizer().backend_tokenizer.to_str())
    saved = json.loads((tiny_models["large"] / "tokenizer.json").read_text())
    assert fresh["model"]["vocab"] == saved["model"]["vocab"]
    assert fresh["model"]["merges"] == saved["model"]["merges"]


def test_training_deterministic(monkeypatch):
    monkeypatch.setitem(tm.TRAIN_SPEC, "steps", 3)
    tok = tm.build_tokenizer()
    stream = tm._token_stream(tok, tm.train_corpus()[:3])
    svd = tm._bigram_svd(stream)
    with tm._torch_threads(1):
        a = tm._train_model("small", stream, svd, log=lambda *_: None).state_dict()
        b = tm._train_model("small", stream, svd, log=lambda *_: None).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.skipif(os.environ.get("VLLM_COS_FULL_REBUILD") != "1",
                    reason="full rebuild (~30 s CPU); set VLLM_COS_FULL_REBUILD=1")
def test_full_rebuild_identical(tiny_models, tmp_path):
    fresh = tm.build_tiny_models(tmp_path / "tiny")
    for name in NAMES:
        for f in ("model.safetensors", "tokenizer.json", "config.json"):
            assert (fresh[name] / f).read_bytes() == (tiny_models[name] / f).read_bytes(), \
                f"{name}/{f}"
