"""Turning ``--speculative-config cos.yaml`` into a vLLM engine set-up (no vLLM imports).

The user gives vLLM a CoS file (or dict) where a speculative config is expected::

    vllm serve models/tiny/large --speculative-config cos.yaml
    LLM(model="models/tiny/large", speculative_config="cos.yaml")   # or a dict

:func:`prepare_engine` reads it, checks everything that can be checked before an engine
starts (the configuration itself, that the served model is one of the collaborators, that
all collaborators share one tokenizer, the runner) and returns the stock engine arguments
that realise it:

* ``standard``: no speculative decoding; the served architecture is replaced by
  :data:`STANDARD_ARCH`, a wrapper holding every collaborator whose logits are log r.
* ``naive`` / ``alternate``: vLLM's ``draft_model`` speculative decoding whose draft model
  is :data:`DRAFT_GROUP_ARCH`, every collaborator but the served one, drafting the tokens
  of :func:`draft_plan` per step; our proposer and rejection sampler replace the stock
  ones inside the worker.

The CoS configuration travels to every process as ``additional_config["cos"]`` (plain data,
absolute paths).  Every problem raises :class:`CoSStartupError` (or
:class:`vllm_cos.config.ConfigError`) with a one-line message.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from vllm_cos.config import CoSConfig, ConfigError, load_config

logger = logging.getLogger("vllm.cos")  # under vLLM's configured "vllm" logger

ADDITIONAL_CONFIG_KEY = "cos"
STANDARD_ARCH = "CoSStandardForCausalLM"
DRAFT_GROUP_ARCH = "CoSDraftGroupForCausalLM"
MAX_ENGINE_MODELS = 4
# The one place that states what the plugin runs on.
SUPPORTED_RUNNER = "vLLM V1 model runner (GPUModelRunner / CPUModelRunner) with synchronous scheduling"


class CoSStartupError(RuntimeError):
    """A CoS engine cannot start; the message is one line meant for the user."""


# ------------------------------------------------------------------ recognising a CoS spec

def is_cos_spec(value: Any) -> bool:
    """True when ``value`` (given as a speculative config) is a CoS configuration."""
    if isinstance(value, Mapping):
        return "models" in value and "method" not in value
    if isinstance(value, (str, os.PathLike)):
        text = str(value)
        if "\n" in text or text.lstrip().startswith(("{", "models")):
            return True
        return text.endswith((".yaml", ".yml", ".json")) or Path(text).is_file()
    return False


def read_cos_spec(value: Any) -> tuple[dict, Path]:
    """The raw mapping of a CoS spec and the directory its relative paths refer to."""
    if isinstance(value, Mapping):
        return dict(value), Path.cwd()
    text = str(value)
    base_dir = Path.cwd()
    path = Path(os.path.expanduser(text))
    if "\n" not in text and not text.lstrip().startswith("{"):
        if not path.is_file():
            raise ConfigError("<file>", f"{text} does not exist")
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError("<file>", f"cannot read {text}: {exc}") from None
        base_dir = path.resolve().parent
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise ConfigError("<file>", f"{value} is not valid YAML: {first}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError("<top level>", f"must be a mapping, got {type(raw).__name__}")
    return dict(raw), base_dir


def parse_cli_value(value: str) -> Any:
    """``--speculative-config`` value: JSON (stock behaviour) or a CoS YAML file path.

    Returns the parsed JSON object, or for a CoS file its path (kept so that relative model
    paths resolve against the file's directory once the served model is known).  Raises
    ValueError with one line for a malformed CoS file.
    """
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    if not is_cos_spec(value):
        raise ValueError(f"{value!r} is neither JSON nor a CoS YAML file")
    raw, base_dir = read_cos_spec(value)  # syntax and top-level shape, early
    load_config(_resolve_paths(raw, base_dir))  # every field, early
    return value


# ------------------------------------------------------------------ building the set-up

def _resolve_paths(raw: dict, base_dir: Path) -> dict:
    raw = dict(raw)
    models = raw.get("models")
    if isinstance(models, list):
        resolved = []
        for item in models:
            if isinstance(item, str):
                item = {"path": item}
            if isinstance(item, Mapping) and isinstance(item.get("path"), str) and item["path"]:
                item = dict(item)
                p = Path(os.path.expanduser(item["path"]))
                item["path"] = str(p if p.is_absolute() else base_dir / p)
            resolved.append(item)
        raw["models"] = resolved
    return raw


def load_cos_spec(value: Any, served_model: str) -> CoSConfig:
    """Load a CoS spec for an engine serving ``served_model`` (a path or a name in the file).

    The served model is one collaborator: it is the config's ``target``.  If the file does
    not list it, it is added (name = its directory name) in front of the others.
    """
    raw, base_dir = read_cos_spec(value)
    raw = _resolve_paths(raw, base_dir)
    models = raw.get("models")
    if not isinstance(models, list):
        return load_config(raw)  # let the config name the problem
    served_path = Path(os.path.expanduser(served_model))
    served_resolved = str(served_path.resolve()) if served_path.exists() else None
    served_name = None
    for i, item in enumerate(models):
        if not isinstance(item, Mapping):
            continue
        path = item.get("path")
        name = item.get("name") or (Path(path).resolve().name if isinstance(path, str) else None)
        same_path = (served_resolved is not None and isinstance(path, str)
                     and Path(path).exists() and str(Path(path).resolve()) == served_resolved)
        if same_path or name == served_model:
            served_name = name
            break
    if served_name is None:
        if served_resolved is None or not served_path.is_dir():
            names = [m.get("name", m.get("path")) if isinstance(m, Mapping) else m for m in models]
            raise CoSStartupError(
                f"cos: the served model {served_model!r} is not a local model directory and is not "
                f"one of the models in the CoS config ({', '.join(map(str, names))})")
        served_name = served_path.resolve().name
        raw["models"] = [{"name": served_name, "path": served_resolved}] + list(models)
    if "target" in raw and raw["target"] != served_name:
        raise CoSStartupError(
            f"cos config: target: is {raw['target']!r} but vLLM serves {served_model!r} "
            f"(model {served_name!r}); the served model is the target")
    raw["target"] = served_name
    cfg = load_config(raw)
    if len(cfg.models) > MAX_ENGINE_MODELS:
        raise CoSStartupError(
            f"cos config: models: the vLLM engine supports up to {MAX_ENGINE_MODELS} collaborating "
            f"models, got {len(cfg.models)} ({', '.join(cfg.model_names)})")
    if cfg.schedule == "naive" and cfg.proposer == cfg.target:
        raise CoSStartupError(
            f"cos config: proposer: under 'naive' the served model {cfg.target!r} cannot be the "
            f"proposer in vLLM; serve {other_model(cfg).name!r} instead or use schedule 'alternate'")
    return cfg


def other_model(cfg: CoSConfig):
    """The first collaborator that is not the served model (its checkpoint is the draft model's)."""
    return next(m for m in cfg.models if m.name != cfg.target)


def draft_plan(cfg: CoSConfig) -> tuple[int, ...]:
    """Who drafts each token of one engine step (config indices, in drafting order).

    In vLLM the served model T verifies every step and proposes one bonus token; the other
    collaborators (the draft group, all run on every drafter pass) then draft in turn:

    * ``naive``: the proposer drafts its gamma tokens;
    * ``alternate``: starting with the proposer (the first non-served model if the proposer
      is T), each non-served model in config order drafts its gamma tokens -- the first one
      is its bonus after scoring what was proposed before it (n-model CoS, section 3.4).
    """
    n = len(cfg.models)
    target = cfg.index(cfg.target)
    proposer = cfg.index(cfg.proposer)
    if cfg.schedule == "naive":
        return (proposer,) * cfg.models[proposer].gamma
    if cfg.schedule != "alternate":
        return ()
    start = proposer if proposer != target else (target + 1) % n
    order = [(start + k) % n for k in range(n)]
    return tuple(i for i in order if i != target for _ in range(cfg.models[i].gamma))


def target_model(cfg: CoSConfig):
    return cfg.models[cfg.index(cfg.target)]


def _tokenizer_vocab(path: str) -> dict[str, int] | None:
    p = Path(path)
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                           "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()


def _model_vocab_size(path: str) -> int | None:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config", config)
    size = text.get("vocab_size", config.get("vocab_size"))
    return int(size) if size is not None else None


def check_vocabularies(cfg: CoSConfig) -> int:
    """All collaborators must share one tokenizer; returns its size.

    A model whose embedding is padded beyond the tokenizer (vocab_size > len(tokenizer))
    is fine: the padding rows are masked at run time.
    """
    vocabs = {m.name: _tokenizer_vocab(m.path) for m in cfg.models}
    reference_name = cfg.target if vocabs.get(cfg.target) is not None else next(
        (n for n, v in vocabs.items() if v is not None), None)
    if reference_name is None:
        raise CoSStartupError(f"cos: no tokenizer found in any model directory ({', '.join(cfg.model_names)})")
    reference = vocabs[reference_name]
    for name, vocab in vocabs.items():
        if vocab is not None and vocab != reference:
            raise CoSStartupError(
                f"cos: models {reference_name!r} (tokenizer vocab {len(reference)}) and {name!r} "
                f"(tokenizer vocab {len(vocab)}) use different tokenizers; collaborating models "
                f"must share one vocabulary")
    tokenizer_size = len(reference)
    for m in cfg.models:
        size = _model_vocab_size(m.path)
        if size is not None and size < tokenizer_size:
            raise CoSStartupError(
                f"cos: model {m.name!r} has vocab_size {size} but the shared tokenizer of "
                f"{reference_name!r} has {tokenizer_size} tokens")
    return tokenizer_size


def kv_share_line(bytes_per_token: Mapping[str, int], block_size: int, num_blocks: int,
                  num_groups: int = 1) -> str:
    """The start-up line on the KV split (all models' layers share one block table)."""
    total = sum(bytes_per_token.values()) or 1
    shares = ", ".join(f"{name} {b} B/token ({100 * b / total:.0f}%)" for name, b in bytes_per_token.items())
    line = (f"cos: KV cache holds {num_blocks * block_size} tokens ({num_blocks} blocks x {block_size}) "
            f"for each of the {len(bytes_per_token)} models; memory split by KV size: {shares}")
    if num_groups > 1:
        line += f" ({num_groups} KV cache groups: capacity is per group)"
    return line


def check_runner(env: Mapping[str, str] | None = None, async_scheduling: bool | None = None) -> None:
    env = os.environ if env is None else env
    v2 = str(env.get("VLLM_USE_V2_MODEL_RUNNER", "")).strip().lower()
    if v2 in ("1", "true", "yes", "on"):
        raise CoSStartupError(
            f"cos: VLLM_USE_V2_MODEL_RUNNER=1 is set, but CoS runs on the {SUPPORTED_RUNNER}; "
            f"unset it or set it to 0")
    if async_scheduling:
        raise CoSStartupError(
            f"cos: async scheduling was requested, but CoS runs on the {SUPPORTED_RUNNER}; "
            f"drop --async-scheduling")


def engine_overrides(cfg: CoSConfig, tokenizer_size: int) -> dict[str, Any]:
    """Stock engine arguments that realise ``cfg`` (see module docstring)."""
    cos = cfg.to_dict()
    cos["tokenizer_size"] = tokenizer_size
    overrides: dict[str, Any] = {"additional_config": {ADDITIONAL_CONFIG_KEY: cos},
                                 "async_scheduling": False}
    if cfg.schedule == "standard":
        overrides["speculative_config"] = None
        overrides["hf_overrides"] = {"architectures": [STANDARD_ARCH]}
    else:
        draft = other_model(cfg)
        if cfg.schedule == "alternate" and target_model(cfg).gamma > 1:
            logger.info("cos: the served model %r proposes one token per step in vLLM (its "
                        "verification bonus); gamma %d is used as 1", cfg.target, target_model(cfg).gamma)
        overrides["speculative_config"] = {
            "method": "draft_model",
            "model": draft.path,
            "num_speculative_tokens": len(draft_plan(cfg)),
        }
    return overrides


def prepare_engine(spec: Any, served_model: str, env: Mapping[str, str] | None = None,
                   async_scheduling: bool | None = None) -> tuple[CoSConfig, dict[str, Any]]:
    """Everything checked before an engine starts; returns (config, engine overrides)."""
    check_runner(env, async_scheduling)
    cfg = load_cos_spec(spec, served_model)
    tokenizer_size = check_vocabularies(cfg)
    return cfg, engine_overrides(cfg, tokenizer_size)


def config_from_additional(additional_config: Mapping[str, Any] | None) -> tuple[CoSConfig, int] | None:
    """Inside a worker: the CoS config carried in ``additional_config`` (or None)."""
    if not additional_config or ADDITIONAL_CONFIG_KEY not in additional_config:
        return None
    data = dict(additional_config[ADDITIONAL_CONFIG_KEY])
    tokenizer_size = int(data.pop("tokenizer_size"))
    return load_config(data), tokenizer_size


def shutdown_llm(llm) -> None:
    """Stop an offline ``vllm.LLM``'s engine core now (its memory is free once unreferenced)."""
    if llm is None:
        return
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as exc:  # already stopped, or a half-built engine
        logger.debug("cos: engine shutdown: %s", exc)
    import gc

    gc.collect()


def cos_stats(llm) -> list[dict | None]:
    """CoS counters per worker of an offline ``vllm.LLM`` (naive / alternate schedules):
    steps (= served-model forwards), draft_forwards (other model), drafts proposed/accepted,
    bonus proposed/accepted, tokens emitted, row_steps (verification rounds = request-steps),
    acceptance rate, mean tokens per step, mean accepted length (tokens per round).

    The same counters are Prometheus metrics ``vllm_cos_*`` (``/metrics`` of ``vllm serve``)
    and a "CoS metrics" log line; see :mod:`vllm_cos.adapters.metrics`."""
    from vllm_cos.adapters.spec_decode import worker_stats

    return llm.collective_rpc(worker_stats)
