"""CoS config glue: --speculative-config / speculative_config accept a CoS file or dict.

Fast tier: no engine starts.  The CLI tests (a real ``vllm serve`` process that must fail
with one line) are in the engine tier because importing vLLM takes ~30 s per process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_cos import engine
from vllm_cos.config import ConfigError


@pytest.fixture(scope="session")
def models(tiny_models) -> dict[str, Path]:
    return tiny_models


def _yaml(tmp_path: Path, text: str, name: str = "cos.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _spec(models, schedule="alternate", rule=None):
    return {
        "models": [{"name": "large", "path": str(models["large"]), "gamma": 1},
                   {"name": "small", "path": str(models["small"]), "gamma": 3}],
        "rule": rule or {"name": "weighted_ensemble", "weights": {"large": 0.5, "small": 0.5}},
        "schedule": schedule,
    }


# ------------------------------------------------------------------ recognising and parsing

def test_is_cos_spec():
    assert engine.is_cos_spec({"models": [], "rule": "x"})
    assert not engine.is_cos_spec({"method": "draft_model", "model": "m"})
    assert engine.is_cos_spec("cos.yaml")
    assert not engine.is_cos_spec(None)


def test_cli_value_json_passes_through():
    assert engine.parse_cli_value('{"method": "ngram", "num_speculative_tokens": 2}') == {
        "method": "ngram", "num_speculative_tokens": 2}


def test_cli_value_yaml_path_is_kept(tmp_path, models):
    path = _yaml(tmp_path, json.dumps(_spec(models)))
    assert engine.parse_cli_value(str(path)) == str(path)


def test_cli_value_malformed_yaml_is_one_line(tmp_path):
    path = _yaml(tmp_path, "models: [\n  {name: a\n")
    with pytest.raises(ConfigError) as err:
        engine.parse_cli_value(str(path))
    assert "not valid YAML" in str(err.value) and "\n" not in str(err.value)


def test_cli_value_bad_field_names_it(tmp_path, models):
    spec = _spec(models)
    spec["models"][1]["gamma"] = -2
    with pytest.raises(ConfigError, match=r"models\[1\]\.gamma"):
        engine.parse_cli_value(str(_yaml(tmp_path, json.dumps(spec))))


def test_cli_value_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        engine.parse_cli_value("/nonexistent/cos.yaml")


# ------------------------------------------------------------------ engine set-up

def test_relative_paths_resolve_against_the_file(tmp_path, models):
    shutil.copytree(models["small"], tmp_path / "small")
    path = _yaml(tmp_path, "models:\n  - {name: small, path: small, gamma: 2}\nrule: weighted_ensemble\n")
    cfg = engine.load_cos_spec(str(path), str(models["large"]))
    assert cfg.target == "large"  # the served model is added in front
    assert cfg.model_names == ("large", "small")
    assert cfg.models[1].path == str((tmp_path / "small").resolve())


@pytest.mark.parametrize("schedule", ["naive", "alternate"])
def test_speculative_schedules_use_the_draft_model_path(models, schedule):
    cfg, overrides = engine.prepare_engine(_spec(models, schedule), str(models["large"]), env={})
    assert overrides["speculative_config"] == {
        "method": "draft_model", "model": str(Path(models["small"]).resolve()), "num_speculative_tokens": 3}
    assert overrides["async_scheduling"] is False
    carried = engine.config_from_additional(overrides["additional_config"])
    assert carried is not None and carried[0] == cfg


def test_standard_uses_the_wrapper_architecture(models):
    _, overrides = engine.prepare_engine(_spec(models, "standard"), str(models["large"]), env={})
    assert overrides["speculative_config"] is None
    assert overrides["hf_overrides"] == {"architectures": [engine.STANDARD_ARCH]}


def test_served_model_must_be_the_target(models):
    spec = dict(_spec(models), target="small")
    with pytest.raises(engine.CoSStartupError, match="the served model is the target"):
        engine.prepare_engine(spec, str(models["large"]), env={})


def _three(models, schedule="alternate", gamma=(1, 1, 2), proposer=None):
    spec = {"models": [{"name": n, "path": str(models[n])} for n in ("large", "medium", "small")],
            "rule": "weighted_ensemble", "schedule": schedule, "gamma": list(gamma)}
    if proposer:
        spec["proposer"] = proposer
    return spec


@pytest.mark.parametrize("schedule, gamma, proposer, plan, drafts", [
    ("alternate", (1, 1, 2), None, ("medium", "small", "small"), 3),
    ("alternate", (1, 1, 2), "small", ("small", "small", "medium"), 3),
    ("alternate", (3, 1, 1), "large", ("medium", "small"), 2),  # served model: one bonus per step
    ("naive", (1, 1, 2), "small", ("small", "small"), 2),
])
def test_three_model_draft_plan(models, schedule, gamma, proposer, plan, drafts):
    cfg, overrides = engine.prepare_engine(_three(models, schedule, gamma, proposer), str(models["large"]), env={})
    assert tuple(cfg.model_names[i] for i in engine.draft_plan(cfg)) == plan
    spec = overrides["speculative_config"]
    assert spec["num_speculative_tokens"] == drafts
    assert spec["model"] == str(Path(models["medium"]).resolve())  # the draft group's first checkpoint


def test_gamma_list_must_match_the_models(models):
    spec = _three(models, gamma=(1, 2))
    with pytest.raises(ConfigError, match=r"^cos config: gamma: has 2 entries but models lists 3 "
                                          r"\(large, medium, small\)"):
        engine.prepare_engine(spec, str(models["large"]), env={})


def test_five_models_refused(models, tmp_path):
    spec = _three(models, gamma=(1, 1, 1, 1, 1))
    for name in ("copy1", "copy2"):
        shutil.copytree(models["small"], tmp_path / name)
        spec["models"].append({"name": name, "path": str(tmp_path / name)})
    with pytest.raises(engine.CoSStartupError, match="supports up to 4 collaborating models, got 5"):
        engine.prepare_engine(spec, str(models["large"]), env={})


def test_kv_share_line():
    line = engine.kv_share_line({"large": 2048, "medium": 1536, "small": 1024}, 16, 100)
    assert line.startswith("cos: KV cache holds 1600 tokens (100 blocks x 16) for each of the 3 models")
    assert "large 2048 B/token (44%)" in line and "small 1024 B/token (22%)" in line


def test_naive_proposer_cannot_be_the_served_model(models):
    spec = dict(_spec(models, "naive"), proposer="large")
    with pytest.raises(engine.CoSStartupError, match="cannot be the proposer"):
        engine.prepare_engine(spec, str(models["large"]), env={})


def test_unsupported_runner_refused(models):
    with pytest.raises(engine.CoSStartupError, match="VLLM_USE_V2_MODEL_RUNNER"):
        engine.prepare_engine(_spec(models), str(models["large"]), env={"VLLM_USE_V2_MODEL_RUNNER": "1"})
    with pytest.raises(engine.CoSStartupError, match="async scheduling"):
        engine.prepare_engine(_spec(models), str(models["large"]), env={}, async_scheduling=True)


def _other_tokenizer_model(models, tmp_path) -> Path:
    """A copy of 'small' whose tokenizer has a different (word-level) vocabulary."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = tmp_path / "othertok"
    shutil.copytree(models["small"], out)
    for f in out.glob("*token*"):
        f.unlink()
    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<unk>", "a", "b", "c"])}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)
    return out


def test_different_vocabularies_name_both_models(models, tmp_path):
    other = _other_tokenizer_model(models, tmp_path)
    spec = {"models": [{"name": "large", "path": str(models["large"])},
                       {"name": "othertok", "path": str(other)}], "rule": "weighted_ensemble"}
    with pytest.raises(engine.CoSStartupError) as err:
        engine.prepare_engine(spec, str(models["large"]), env={})
    message = str(err.value)
    assert "'large'" in message and "'othertok'" in message and "(tokenizer vocab 6)" in message


def test_three_models_one_tokenizer_differs(models, tmp_path):
    other = _other_tokenizer_model(models, tmp_path)
    spec = _three(models)
    spec["models"][2] = {"name": "othertok", "path": str(other)}
    with pytest.raises(engine.CoSStartupError) as err:
        engine.prepare_engine(spec, str(models["large"]), env={})
    message = str(err.value)
    assert "'large'" in message and "'othertok'" in message and "different tokenizers" in message


def test_embedding_padding_is_allowed(models, tmp_path):
    padded = tmp_path / "padded"
    shutil.copytree(models["small"], padded)
    config = json.loads((padded / "config.json").read_text())
    tokenizer_size = config["vocab_size"]
    config["vocab_size"] = tokenizer_size + 64
    (padded / "config.json").write_text(json.dumps(config))
    spec = {"models": [{"name": "large", "path": str(models["large"])},
                       {"name": "padded", "path": str(padded)}], "rule": "weighted_ensemble"}
    _, overrides = engine.prepare_engine(spec, str(models["large"]), env={})
    assert overrides["additional_config"]["cos"]["tokenizer_size"] == tokenizer_size


def test_engine_args_rewritten_in_place(models, tmp_path):
    """The hook on EngineArgs (no engine is started)."""
    from vllm_cos.adapters.engine_args import apply_cos
    from vllm.engine.arg_utils import EngineArgs

    path = _yaml(tmp_path, json.dumps(_spec(models, "standard")))
    args = EngineArgs(model=str(models["large"]), speculative_config=str(path))
    assert apply_cos(args)
    assert args.speculative_config is None
    assert args.hf_overrides["architectures"] == [engine.STANDARD_ARCH]
    assert args.additional_config["cos"]["schedule"] == "standard"
    plain = EngineArgs(model=str(models["large"]))
    assert not apply_cos(plain)


# ------------------------------------------------------------------ the command line

def _serve(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    return subprocess.run([sys.executable, "-m", "vllm_cos.cli", "serve", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.engine
def test_cli_malformed_yaml_exits_with_one_line(tmp_path, models):
    path = _yaml(tmp_path, "models: [\n  {name: a\n")
    proc = _serve([str(models["large"]), "--speculative-config", str(path)])
    assert proc.returncode != 0
    assert "--speculative-config" in _last_line(proc.stderr) and "not valid YAML" in _last_line(proc.stderr)
    assert "Traceback" not in proc.stderr


@pytest.mark.engine
def test_cli_vocab_mismatch_exits_with_one_line(tmp_path, models):
    other = _other_tokenizer_model(models, tmp_path)
    path = _yaml(tmp_path, json.dumps({"models": [{"name": "large", "path": str(models["large"])},
                                                  {"name": "othertok", "path": str(other)}],
                                       "rule": "weighted_ensemble"}))
    proc = _serve([str(models["large"]), "--speculative-config", str(path)])
    assert proc.returncode == 1
    line = _last_line(proc.stderr)
    assert line.startswith("error: cos:") and "'othertok'" in line, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
