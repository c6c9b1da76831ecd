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

from vllm_cos.config import SERVED_POLICIES, CoSConfig, ConfigError, load_config, read_file_text
from vllm_cos.model_files import model_dir_problem

logger = logging.getLogger("vllm.cos")  # under vLLM's configured "vllm" logger

ADDITIONAL_CONFIG_KEY = "cos"
STANDARD_ARCH = "CoSStandardForCausalLM"
DRAFT_GROUP_ARCH = "CoSDraftGroupForCausalLM"
MAX_ENGINE_MODELS = 4
# Named in the engine arguments (a string: no adapters import here); adds ``cos_stats`` to
# every worker so that ``LLM.collective_rpc("cos_stats")`` works across processes.
WORKER_EXTENSION_CLS = "vllm_cos.adapters.worker_ext.CoSWorkerExtension"
WORKER_EXTENSION_METHOD = "cos_stats"
_DTYPE_ALIASES = {"half": "float16", "float": "float32"}
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
        text = read_file_text(path)
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
    """Model paths (and a cosd rule's tree file) relative to ``base_dir`` made absolute."""
    raw = dict(raw)
    rule = raw.get("rule")
    if isinstance(rule, Mapping) and isinstance(rule.get("tree"), str) and rule["tree"]:
        tree = Path(os.path.expanduser(rule["tree"]))
        raw["rule"] = {**rule, "tree": str(tree if tree.is_absolute() else base_dir / tree)}
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


def _entry_name(item: Any) -> str | None:
    if isinstance(item, str):
        return Path(item).name
    if not isinstance(item, Mapping):
        return None
    path = item.get("path")
    return item.get("name") or (Path(path).resolve().name if isinstance(path, str) else None)


def _served_entry(models: list, served_model: str) -> str | None:
    """Name of the file's entry that is the served model: same directory, else same name."""
    served = Path(os.path.expanduser(served_model))
    if served.exists():
        for item in models:
            path = item.get("path") if isinstance(item, Mapping) else None
            if isinstance(path, str) and Path(path).exists() and Path(path).resolve() == served.resolve():
                return _entry_name(item)
    return next((n for n in map(_entry_name, models) if n == served_model), None)


def _listing(models: list) -> str:
    paths = [m.get("path") if isinstance(m, Mapping) else m for m in models]
    return ", ".join(f"{_entry_name(m)} ({Path(p).resolve() if isinstance(p, str) else p})"
                     for m, p in zip(models, paths))


def _join_served(raw: dict, models: list, served_model: str) -> str:
    """The served model is not in the file: refuse (name the real problem) unless ``served: join``."""
    served = Path(os.path.expanduser(served_model))
    if not served.is_dir():
        raise CoSStartupError(
            f"cos: the served model {served_model!r} is not a local model directory and is not "
            f"one of the models in the CoS config ({_listing(models)})")
    resolved, folder = str(served.resolve()), served.resolve().name
    clash = next((m for m in models if _entry_name(m) == folder), None)
    if clash is not None:
        path = clash.get("path") if isinstance(clash, Mapping) else clash
        path = Path(path).resolve() if isinstance(path, str) else path
        raise CoSStartupError(
            f"cos: the served model {resolved} is not the CoS config's model {folder!r} ({path}); "
            f"serve {path}, or list {resolved} under models with a name of its own")
    policy = raw.get("served", "listed")
    if policy != "join":
        if policy not in SERVED_POLICIES:
            load_config(raw)  # names the bad value
        raise CoSStartupError(
            f"cos: the served model {resolved} is not one of the models in the CoS config "
            f"({_listing(models)}); serve one of them, list it under models, or set "
            f"'served: join' in the file to add it to the collaboration")
    raw["models"] = [{"name": folder, "path": resolved}] + list(models)
    logger.info("cos: the served model %r joins the collaboration ('served: join')", folder)
    return folder


def _served_spec(value: Any, served_model: str) -> dict:
    """The raw spec with absolute paths, the served model in ``models`` and as ``target``."""
    raw, base_dir = read_cos_spec(value)
    raw = _resolve_paths(raw, base_dir)
    models = raw.get("models")
    if not isinstance(models, list):
        return raw  # load_config names the problem
    served_name = _served_entry(models, served_model) or _join_served(raw, models, served_model)
    if "target" in raw and raw["target"] != served_name:
        raise CoSStartupError(
            f"cos config: target: is {raw['target']!r} but vLLM serves {served_model!r} "
            f"(model {served_name!r}); the served model is the target")
    raw["target"] = served_name
    return raw


def _check_engine_fit(cfg: CoSConfig, raw: Mapping) -> None:
    """What a valid configuration must also satisfy to run inside one vLLM engine."""
    if len(cfg.models) > MAX_ENGINE_MODELS:
        raise CoSStartupError(
            f"cos config: models: the vLLM engine supports up to {MAX_ENGINE_MODELS} collaborating "
            f"models, got {len(cfg.models)} ({', '.join(cfg.model_names)})")
    if cfg.schedule == "naive" and cfg.proposer == cfg.target:
        raise CoSStartupError(
            f"cos config: proposer: under 'naive' the served model {cfg.target!r} cannot be the "
            f"proposer in vLLM; serve {other_model(cfg).name!r} instead or use schedule 'alternate'")
    i = cfg.index(cfg.target)
    if cfg.schedule == "alternate" and cfg.models[i].gamma > 1:
        where = "gamma" if isinstance(raw.get("gamma"), int) else (
            f"gamma[{i}]" if "gamma" in raw else f"models[{i}].gamma")
        raise CoSStartupError(
            f"cos config: {where}: the served model {cfg.target!r} proposes exactly one token per "
            f"step in vLLM (sampled from its own p while it verifies), got gamma {cfg.models[i].gamma}; set "
            f"its gamma to 1 (the other models' gamma sets how much they draft)")


def config_notes(cfg: CoSConfig, raw: Mapping) -> list[str]:
    """Fields the file sets that cannot change what this vLLM engine does (start-up warnings)."""
    notes = []
    if cfg.schedule == "standard":
        notes += [f"{key}: has no effect under 'standard' (every model scores every token)"
                  for key in ("proposer", "proposal") if key in raw]
    elif cfg.schedule == "alternate" and len(cfg.models) == 2 and "proposer" in raw:
        notes.append(
            f"proposer: {cfg.proposer!r} has no effect in vLLM under 'alternate' with two models: "
            f"the served model {cfg.target!r} verifies and proposes one token every step, "
            f"{other_model(cfg).name!r} drafts the rest (with 3+ models it picks who drafts first)")
    return notes


def resolve_spec(value: Any, served_model: str) -> tuple[CoSConfig, list[str]]:
    """The configuration an engine serving ``served_model`` runs, and :func:`config_notes`.

    The served model is one collaborator and the config's ``target``: the file's entry with
    the same directory (or, for a name, the same name).  A served model the file does not
    list is refused unless the file says ``served: join``.
    """
    raw = _served_spec(value, served_model)
    cfg = load_config(raw)
    _check_engine_fit(cfg, raw)
    return cfg, config_notes(cfg, raw)


def load_cos_spec(value: Any, served_model: str) -> CoSConfig:
    """Load a CoS spec for an engine serving ``served_model`` (see :func:`resolve_spec`)."""
    return resolve_spec(value, served_model)[0]


def other_model(cfg: CoSConfig):
    """The first collaborator that is not the served model (its checkpoint is the draft model's)."""
    return next(m for m in cfg.models if m.name != cfg.target)


def draft_plan(cfg: CoSConfig) -> tuple[int, ...]:
    """Who drafts each token of one engine step (config indices, in drafting order).

    In vLLM the served model T verifies every step and proposes one token of its own; the other
    collaborators (the draft group, all run on every drafter pass) then draft in turn:

    * ``naive``: the proposer drafts its gamma tokens;
    * ``alternate``: starting with the proposer (the first non-served model if the proposer
      is T), each non-served model in config order drafts its gamma tokens -- the first one
      is its own proposal after scoring what was proposed before it (n-model CoS, section 3.4).
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


def check_collaborators(cfg: CoSConfig) -> int:
    """The collaborators' files, their shared tokenizer (its size is returned) and a trial of the
    rule: what both an engine start and ``vllm-cos check`` verify after the configuration."""
    check_model_files(cfg)
    tokenizer_size = check_vocabularies(cfg)
    check_rule(cfg, tokenizer_size)
    return tokenizer_size


def check_model_files(cfg: CoSConfig) -> None:
    """Every collaborator's directory holds a readable config, weights and tokenizer files
    (:func:`vllm_cos.model_files.model_dir_problem`): one line naming the file otherwise."""
    for m in cfg.models:
        problem = model_dir_problem(m.path)
        if problem is not None:
            raise CoSStartupError(f"cos: model {m.name!r}: {problem}")


def check_rule(cfg: CoSConfig, tokenizer_size: int) -> None:
    """Run the combination rule once on random logits [models, 2, vocab] (a custom rule that fails
    or returns the wrong shape is refused here, not in the middle of a request)."""
    import torch

    from vllm_cos.combine import build_combiner

    member_logits = torch.randn(len(cfg.models), 2, tokenizer_size, generator=torch.Generator().manual_seed(0))
    try:
        log_r = build_combiner(cfg.rule, cfg.model_names)(member_logits)
        if not isinstance(log_r, torch.Tensor) or tuple(log_r.shape) != (2, tokenizer_size):
            shape = tuple(log_r.shape) if isinstance(log_r, torch.Tensor) else type(log_r).__name__
            raise ValueError(f"returned {shape}, not [num_tokens, vocab] = (2, {tokenizer_size})")
        if not torch.isfinite(torch.logsumexp(log_r.float(), dim=-1)).all():
            raise ValueError("returned a distribution with no mass (log r is -inf or nan everywhere in a row)")
    except Exception as exc:  # noqa: BLE001 - whatever a user's function raises names the rule
        where = "rule.function" if cfg.rule.name == "custom" else "rule"
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CoSStartupError(f"cos config: {where}: a trial combination of random logits failed: "
                              f"{type(exc).__name__}: {reason}") from None


def _tokenizer_vocab(name: str, path: str) -> dict[str, int] | None:
    p = Path(path)
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                           "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path).get_vocab()
    except Exception as exc:  # noqa: BLE001 - any loader failure is this directory's tokenizer files
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CoSStartupError(f"cos: model {name!r}: the tokenizer in {path} cannot be loaded ({reason})") from None


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
    vocabs = {m.name: _tokenizer_vocab(m.name, m.path) for m in cfg.models}
    paths = {m.name: m.path for m in cfg.models}
    reference_name = cfg.target if vocabs.get(cfg.target) is not None else next(
        (n for n, v in vocabs.items() if v is not None), None)
    if reference_name is None:
        raise CoSStartupError(f"cos: no tokenizer found in any model directory ({', '.join(cfg.model_names)})")
    reference = vocabs[reference_name]
    for name, vocab in vocabs.items():
        if vocab is not None and vocab != reference:
            raise CoSStartupError(
                f"cos: models {reference_name!r} (tokenizer of {len(reference)} tokens in {paths[reference_name]}) "
                f"and {name!r} ({len(vocab)} tokens in {paths[name]}) use different tokenizers; "
                f"collaborating models must share one vocabulary")
    tokenizer_size = len(reference)
    for m in cfg.models:
        size = _model_vocab_size(m.path)
        if size is not None and size < tokenizer_size:
            raise CoSStartupError(
                f"cos: model {m.name!r} has vocab_size {size} ({Path(m.path) / 'config.json'}) but the "
                f"shared tokenizer of {reference_name!r} has {tokenizer_size} tokens")
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


def check_parallel(cfg: CoSConfig | None, pipeline: int = 1, tensor: int = 1, data: int = 1) -> None:
    """What parallelism a CoS engine runs under (tensor parallel: every collaborator sharded like
    the served model, verified greedy- and seed-identical to one rank); ``cfg`` None: the checks
    that need no configuration."""
    if pipeline > 1:
        raise CoSStartupError(
            f"cos: --pipeline-parallel-size {pipeline} is not supported: CoS combines every collaborator's "
            f"logits inside one engine step, which a pipeline splits across ranks; use --tensor-parallel-size")
    if cfg is not None and tensor > 1 and cfg.schedule != "standard" and cfg.draft_length == "auto":
        raise CoSStartupError(
            f"cos config: gamma: 'auto' (the default without a gamma) is not supported with "
            f"--tensor-parallel-size {tensor}: each rank would choose its draft lengths from its own "
            f"step times; give a fixed gamma (e.g. gamma: 3)")
    if data > 1:
        raise CoSStartupError(
            f"cos: --data-parallel-size {data} is not supported yet (CoS is verified with one engine "
            f"replica); run one server per replica behind your load balancer")


def engine_dtype(cfg: CoSConfig, requested: Any = "auto") -> str | None:
    """The ``dtype`` engine argument the file's per-model ``dtype`` fields ask for (or None).

    vLLM runs every collaborator in the engine's one dtype (``--dtype``; all models' KV share
    one paged cache).  With ``--dtype auto`` the models that set ``dtype`` must agree and
    the engine runs in that dtype; with an explicit ``--dtype`` they must equal it.
    """
    req = str(requested).replace("torch.", "")
    req = _DTYPE_ALIASES.get(req, req)
    asked = [(i, m) for i, m in enumerate(cfg.models) if m.dtype != "auto"]
    if not asked:
        return None
    first_i, first = asked[0]
    for i, m in asked:
        if req != "auto" and m.dtype != req:
            raise CoSStartupError(
                f"cos config: models[{i}].dtype: is {m.dtype} but the engine runs in --dtype {req}; "
                f"vLLM runs every collaborator in the engine's one dtype: drop the field or pass "
                f"--dtype {m.dtype}")
        if m.dtype != first.dtype:
            raise CoSStartupError(
                f"cos config: models[{i}].dtype: is {m.dtype} but models[{first_i}].dtype is "
                f"{first.dtype}; vLLM runs every collaborator in the engine's one dtype: give one dtype")
    return None if req != "auto" else first.dtype


def engine_overrides(cfg: CoSConfig, tokenizer_size: int) -> dict[str, Any]:
    """Stock engine arguments that realise ``cfg`` (see module docstring)."""
    cos = cfg.to_dict()
    cos["tokenizer_size"] = tokenizer_size
    overrides: dict[str, Any] = {"additional_config": {ADDITIONAL_CONFIG_KEY: cos},
                                 "async_scheduling": False,
                                 "worker_extension_cls": WORKER_EXTENSION_CLS}
    if cfg.schedule == "standard":
        overrides["speculative_config"] = None
        overrides["hf_overrides"] = {"architectures": [STANDARD_ARCH]}
    else:
        draft = other_model(cfg)
        overrides["speculative_config"] = {
            "method": "draft_model",
            "model": draft.path,
            "num_speculative_tokens": len(draft_plan(cfg)),
        }
    return overrides


def prepare_engine(spec: Any, served_model: str, env: Mapping[str, str] | None = None,
                   async_scheduling: bool | None = None, dtype: Any = "auto",
                   parallel: Mapping[str, int] | None = None) -> tuple[CoSConfig, dict[str, Any]]:
    """Everything checked before an engine starts; returns (config, engine overrides).
    ``parallel``: the engine's ``pipeline`` / ``tensor`` / ``data`` parallel sizes."""
    check_runner(env, async_scheduling)
    cfg, notes = resolve_spec(spec, served_model)
    check_parallel(cfg, **(parallel or {}))
    for note in notes:
        logger.warning("cos config: %s", note)
    tokenizer_size = check_collaborators(cfg)
    overrides = engine_overrides(cfg, tokenizer_size)
    chosen = engine_dtype(cfg, dtype)
    if chosen is not None:
        overrides["dtype"] = chosen
        logger.info("cos: every collaborator runs in %s (the models' dtype field; --dtype auto)", chosen)
    return cfg, overrides


def config_from_additional(additional_config: Mapping[str, Any] | None) -> tuple[CoSConfig, int] | None:
    """Inside a worker: the CoS config carried in ``additional_config`` (or None)."""
    if not additional_config or ADDITIONAL_CONFIG_KEY not in additional_config:
        return None
    data = dict(additional_config[ADDITIONAL_CONFIG_KEY])
    tokenizer_size = int(data.pop("tokenizer_size"))
    return load_config(data), tokenizer_size
