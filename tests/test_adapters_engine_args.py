"""CoS config glue: --speculative-config / speculative_config accept a CoS file or dict.

Fast tier: no engine starts.  The CLI tests (a real ``vllm serve`` process that must fail
with one line) are in the engine tier because importing vLLM takes ~30 s per process.
"""

from __future__ import annotations

import json
import os
import re
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
    path = _yaml(tmp_path, "models:\n  - {name: small, path: small, gamma: 2}\n  - {path: medium_link}\n"
                           "rule: weighted_ensemble\nserved: join\n")
    (tmp_path / "medium_link").symlink_to(models["medium"])
    cfg = engine.load_cos_spec(str(path), str(models["large"]))
    assert cfg.target == "large"  # served: join -- the served model is added in front
    assert cfg.model_names == ("large", "small", "medium")  # a name defaults to the resolved folder
    assert cfg.models[1].path == str((tmp_path / "small").resolve())


def test_served_model_missing_from_the_file_is_refused(models):
    spec = _spec(models)
    spec["models"][0] = {"name": "medium", "path": str(models["medium"])}
    with pytest.raises(engine.CoSStartupError) as err:
        engine.prepare_engine(spec, str(models["large"]), env={})
    message = str(err.value)
    assert "is not one of the models in the CoS config (medium (" in message
    assert "'served: join'" in message and "\n" not in message


def test_served_join_adds_the_served_model(models):
    spec = dict(_spec(models), served="join")
    spec["models"][0] = {"name": "medium", "path": str(models["medium"])}
    cfg, _ = engine.prepare_engine(spec, str(models["large"]), env={})
    assert cfg.model_names == ("large", "medium", "small") and cfg.target == "large"
    with pytest.raises(ConfigError, match=r"^cos config: served: must be one of listed, join, got 'yes'"):
        engine.prepare_engine(dict(spec, served="yes"), str(models["large"]), env={})


def test_served_folder_with_a_listed_name_but_another_path(models, tmp_path):
    other = tmp_path / "elsewhere" / "large"
    shutil.copytree(models["large"], other)
    with pytest.raises(engine.CoSStartupError) as err:
        engine.prepare_engine(_spec(models), str(other), env={})
    message = str(err.value)
    assert message.startswith(f"cos: the served model {other.resolve()} is not the CoS config's model 'large' "
                              f"({Path(models['large']).resolve()}); serve {Path(models['large']).resolve()}")
    assert "with a name of its own" in message and "listed twice" not in message


def test_served_by_relative_path_and_symlink(models, tmp_path):
    link = tmp_path / "served"
    link.symlink_to(models["large"])
    cfg, _ = engine.prepare_engine(_spec(models), str(link), env={})
    assert cfg.target == "large"


def test_served_gamma_above_one_is_refused(models):
    spec = _spec(models)
    spec["models"][0]["gamma"] = 3
    with pytest.raises(engine.CoSStartupError, match=r"^cos config: models\[0\]\.gamma: the served model 'large' "
                                                     r"proposes exactly one token per step"):
        engine.prepare_engine(spec, str(models["large"]), env={})
    with pytest.raises(engine.CoSStartupError, match=r"^cos config: gamma\[0\]: "):
        engine.prepare_engine(_three(models, gamma=(3, 1, 1)), str(models["large"]), env={})
    with pytest.raises(engine.CoSStartupError, match=r"^cos config: gamma: "):
        engine.prepare_engine(_three(models, gamma=2), str(models["large"]), env={})
    spec["schedule"] = "naive"  # the served model never drafts under naive
    engine.prepare_engine(spec, str(models["large"]), env={})


def test_proposer_that_cannot_matter_is_reported(models, caplog):
    with caplog.at_level("WARNING", logger="vllm.cos"):
        engine.prepare_engine(dict(_spec(models), proposer="small"), str(models["large"]), env={})
    assert "proposer: 'small' has no effect in vLLM under 'alternate' with two models" in caplog.text
    _, notes = engine.resolve_spec(dict(_spec(models, "standard"), proposal="raw"), str(models["large"]))
    assert notes == ["proposal: has no effect under 'standard' (every model scores every token)"]
    _, notes = engine.resolve_spec(_three(models, proposer="small"), str(models["large"]))
    assert notes == []  # with three models the proposer picks who drafts first


@pytest.mark.parametrize("dtypes, requested, expected", [
    (("auto", "auto"), "auto", None),
    (("auto", "float32"), "auto", "float32"),
    (("float32", "float32"), "float", None),
    (("auto", "float32"), "float32", None),
    (("auto", "float32"), "torch.float32", None),
])
def test_engine_dtype_honours_the_models_dtype(models, dtypes, requested, expected):
    spec = _spec(models)
    for item, d in zip(spec["models"], dtypes):
        item["dtype"] = d
    cfg, overrides = engine.prepare_engine(spec, str(models["large"]), env={}, dtype=requested)
    assert overrides.get("dtype") == expected
    assert engine.engine_dtype(cfg, requested) == expected


def test_engine_dtype_conflicts_are_refused(models):
    spec = _spec(models)
    spec["models"][1]["dtype"] = "float32"
    with pytest.raises(engine.CoSStartupError, match=r"^cos config: models\[1\]\.dtype: is float32 but the "
                                                     r"engine runs in --dtype bfloat16; .* pass --dtype float32$"):
        engine.prepare_engine(spec, str(models["large"]), env={}, dtype="bfloat16")
    spec["models"][0]["dtype"] = "bfloat16"
    with pytest.raises(engine.CoSStartupError, match=r"^cos config: models\[1\]\.dtype: is float32 but "
                                                     r"models\[0\]\.dtype is bfloat16"):
        engine.prepare_engine(spec, str(models["large"]), env={})


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
            "rule": "weighted_ensemble", "schedule": schedule,
            "gamma": list(gamma) if isinstance(gamma, tuple) else gamma}
    if proposer:
        spec["proposer"] = proposer
    return spec


@pytest.mark.parametrize("schedule, gamma, proposer, plan, drafts", [
    ("alternate", (1, 1, 2), None, ("medium", "small", "small"), 3),
    ("alternate", (1, 1, 2), "small", ("small", "small", "medium"), 3),
    ("alternate", (1, 1, 1), "large", ("medium", "small"), 2),  # served model: one bonus per step
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


def test_parallelism(models):
    """Tensor parallel runs with a fixed gamma (verified greedy- and seed-identical to one rank, see
    the README); pipeline and data parallel, and gamma: auto under tensor parallel, are refused."""
    fixed, auto = _spec(models), {**_spec(models), "models": [{"name": "large", "path": str(models["large"])},
                                                              {"name": "small", "path": str(models["small"])}]}
    cfg, _ = engine.prepare_engine(fixed, str(models["large"]), env={}, parallel={"tensor": 2})
    assert cfg.draft_length == "fixed"
    standard = {**auto, "schedule": "standard"}  # standard drafts nothing: auto does not apply
    engine.prepare_engine(standard, str(models["large"]), env={}, parallel={"tensor": 2})
    for spec, parallel, words in [(fixed, {"pipeline": 2}, "--pipeline-parallel-size 2 is not supported"),
                                  (auto, {"tensor": 2}, "cos config: gamma: 'auto' (the default without a gamma)"),
                                  (fixed, {"data": 2}, "--data-parallel-size 2 is not supported")]:
        with pytest.raises(engine.CoSStartupError, match=re.escape(words)):
            engine.prepare_engine(spec, str(models["large"]), env={}, parallel=parallel)
    engine.prepare_engine(auto, str(models["large"]), env={}, parallel={"tensor": 1, "pipeline": 1, "data": 1})


def test_ray_is_refused_on_cpu(models):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_cos.adapters.engine_args import apply_cos

    args = EngineArgs(model=str(models["large"]), speculative_config=_spec(models),
                      distributed_executor_backend="ray")
    with pytest.raises(engine.CoSStartupError, match="CPU platform does not support ray"):
        apply_cos(args)


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
    assert "'large'" in message and "'othertok'" in message and f"(6 tokens in {other})" in message


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
    assert args.worker_extension_cls == engine.WORKER_EXTENSION_CLS
    plain = EngineArgs(model=str(models["large"]))
    assert not apply_cos(plain)


class MyExtension:  # a user's worker extension that does not carry cos_stats
    pass


def _my_cos_extension():
    from vllm_cos.adapters.worker_ext import CoSWorkerExtension

    return type("MyCoSExtension", (CoSWorkerExtension,), {})


def test_user_worker_extension_is_composed_or_refused(models, tmp_path, monkeypatch):
    from vllm_cos.adapters.engine_args import apply_cos
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setattr(sys.modules[__name__], "MyCoSExtension", _my_cos_extension(), raising=False)
    path = str(_yaml(tmp_path, json.dumps(_spec(models))))
    ours = f"{__name__}.MyCoSExtension"
    args = EngineArgs(model=str(models["large"]), speculative_config=path, worker_extension_cls=ours)
    assert apply_cos(args) and args.worker_extension_cls == ours  # a subclass of ours is kept
    theirs = f"{__name__}.MyExtension"
    args = EngineArgs(model=str(models["large"]), speculative_config=path, worker_extension_cls=theirs)
    with pytest.raises(engine.CoSStartupError, match=rf"^cos: worker_extension_cls '{theirs}' replaces the one "
                                                     r"CoS needs .* make your class subclass"):
        apply_cos(args)
    args = EngineArgs(model=str(models["large"]), speculative_config=path, worker_extension_cls="no.such.Cls")
    with pytest.raises(engine.CoSStartupError, match=r"^cos: worker_extension_cls 'no.such.Cls' cannot be imported"):
        apply_cos(args)


def test_worker_extension_answers_cos_stats():
    from vllm_cos.adapters.worker_ext import CoSWorkerExtension
    from vllm_cos.offline import cos_stats

    class Worker(CoSWorkerExtension):
        model_runner = None

    assert Worker().cos_stats() is None  # no CoS drafter: standard schedule

    class FakeLLM:
        def collective_rpc(self, method):
            assert method == "cos_stats"  # by name: no function crosses the process boundary
            return [getattr(Worker(), method)()]

    assert cos_stats(FakeLLM()) == [None]


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
    assert proc.returncode == 1  # refused before vLLM's parser (and its usage text) is reached
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: cos config: <file>: {path} is not valid YAML")


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


def test_speculative_config_help_mentions_cos(models, tmp_path):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_cos.adapters import engine_args

    engine_args.install()
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    action = parser._option_string_actions["--speculative-config"]
    assert action.help.endswith(engine_args.COS_HELP) and "vllm-cos check" in action.help
    path = str(_yaml(tmp_path, json.dumps(_spec(models))))
    assert parser.parse_args(["--speculative-config", path]).speculative_config == path
