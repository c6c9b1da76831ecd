"""vllm_cos.model_files: a model directory's unusable file is named before an engine reads it."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from vllm_cos.model_files import model_dir_problem, safetensors_problem


@pytest.fixture
def model(tiny_models, tmp_path) -> Path:
    copy = tmp_path / "small"
    shutil.copytree(tiny_models["small"], copy)
    return copy


def test_a_good_directory_has_no_problem(tiny_models):
    for path in tiny_models.values():
        assert model_dir_problem(path) is None


@pytest.mark.parametrize("cut", [0, 5, 100, -1])
def test_truncated_safetensors_is_named(model, cut):
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: cut if cut >= 0 else len(data) - 1])
    problem = model_dir_problem(model)
    assert problem is not None and str(weights) in problem and "truncated" in problem


def test_safetensors_header_that_is_not_json(model):
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    data[8:8 + header_len] = b"\xff" * header_len
    weights.write_bytes(bytes(data))
    assert "is corrupt" in safetensors_problem(weights)


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    (lambda d: (d / "config.json").write_text("{\"model_type\": "), "config.json is not valid JSON"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "must hold a JSON object"),
    (lambda d: (d / "config.json").write_text("{}"), "has no 'model_type'"),
    (lambda d: (d / "model.safetensors").unlink(), "has no weights"),
    (lambda d: (d / "tokenizer.json").write_text("{\"model\": "), "tokenizer.json is not valid JSON"),
])
def test_each_damage_names_its_file(model, damage, words):
    damage(model)
    problem = model_dir_problem(model)
    assert problem is not None and words in problem and str(model) in problem


def test_sharded_checkpoint_with_a_missing_shard(model):
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    problem = model_dir_problem(model)
    assert "model-00002-of-00002.safetensors is missing" in problem and "index.json" in problem
    (model / "model-00002-of-00002.safetensors").write_bytes((model / "model-00001-of-00002.safetensors").read_bytes())
    assert model_dir_problem(model) is None


def test_not_a_directory(tmp_path):
    assert "is not a directory" in model_dir_problem(tmp_path / "nothing")
