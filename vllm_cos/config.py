"""CoS configuration: one frozen, typed dataclass loaded from YAML (or a dict).

Example (``configs/we-alternate.yaml``)::

    models:
      - {name: large, path: ../models/tiny/large, gamma: 1}
      - {name: small, path: ../models/tiny/small, gamma: 3}
    target: large            # the model vLLM serves (default: the first one)
    rule: {name: weighted_ensemble, weights: {large: 0.5, small: 0.5}}
    schedule: alternate      # standard | naive | alternate
    proposer: small          # naive: the fixed proposer; alternate: who drafts first / after a rejection
    served: listed           # vLLM: a served model the file does not list is refused (join: added)

Relative model paths are resolved against the YAML file's directory (for a dict: the
current directory).  Every invalid value raises :class:`ConfigError` with a message that
names the field, e.g. ``cos config: models[1].gamma: must be >= 0, got -1``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

SCHEDULES = ("standard", "naive", "alternate")
PROPOSALS = ("tempered", "raw")
# served: what vLLM does when it serves a model the file does not list (refuse / add it).
SERVED_POLICIES = ("listed", "join")
DRAFT_LENGTHS = ("fixed", "auto")
# scoring: a draft-group member that is done drafting skips the step's later passes (lazy) or not
SCORINGS = ("lazy", "every_pass")
AUTO_MAX_GAMMA = 4  # gamma: auto -- each drafter drafts up to this many tokens per step
MAX_GAMMA = 32  # drafts per model and step (each step verifies them all in one forward)
DTYPES = ("auto", "float32", "float16", "bfloat16")
CUSTOM_INPUTS = ("probs", "logits")
RULE_NAMES = ("weighted_ensemble", "contrastive", "custom", "cosd")
COSD_VERIFIERS = ("rule", "tree")


class ConfigError(ValueError):
    """An invalid CoS configuration; the message names the offending field."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"cos config: {field_name}: {problem}")
        self.field = field_name


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str  # resolved, existing directory
    gamma: int = 1  # tokens this model proposes per invocation (0: it only scores)
    dtype: str = "auto"


@dataclass(frozen=True)
class RuleSpec:
    name: str  # weighted_ensemble | contrastive | custom | cosd
    weights: Mapping[str, float] = field(default_factory=dict)  # weighted_ensemble
    expert: str | None = None  # contrastive
    amateur: str | None = None  # contrastive
    mu: float = 0.0  # contrastive
    function: str | None = None  # custom: "module:function"
    inputs: str = "probs"  # custom: probs | logits
    params: Mapping[str, Any] = field(default_factory=dict)  # custom: keyword arguments
    draft: str | None = None  # cosd: the model whose tokens x are kept or replaced
    assistant: str | None = None  # cosd: the model whose top token y may replace x
    verifier: str = "rule"  # cosd: rule | tree
    alpha: float = 0.5  # cosd rule: replace only when p_draft(x) < alpha
    beta: float = 0.5  # cosd rule: ... and p_assist(y) > beta * p_draft(x)
    tree: str | None = None  # cosd tree: resolved path of the tree JSON


@dataclass(frozen=True)
class CoSConfig:
    models: tuple[ModelSpec, ...]
    rule: RuleSpec
    target: str
    schedule: str = "alternate"
    proposer: str | None = None  # resolved in validation
    proposal: str = "tempered"  # proposal q: the proposer's own p tempered like r, or raw
    served: str = "listed"  # vLLM: the served model must be listed (or "join": it is added)
    draft_length: str = "fixed"  # vLLM: "auto" = gammas are per-step maxima, each step picks its own
    scoring: str = "lazy"  # vLLM: lazy = a group member scores the drafts after its own once (vllm_cos.lazy)

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    def index(self, name: str) -> int:
        return self.model_names.index(name)

    @property
    def gammas(self) -> tuple[int, ...]:
        return tuple(m.gamma for m in self.models)

    def to_dict(self) -> dict:
        """Plain-data form (round-trips through :func:`load_config`)."""
        return {
            "models": [dict(name=m.name, path=m.path, gamma=m.gamma, dtype=m.dtype) for m in self.models],
            "target": self.target,
            "rule": _rule_to_dict(self.rule),
            "schedule": self.schedule,
            "proposer": self.proposer,
            "proposal": self.proposal,
            "served": self.served,
            "draft_length": self.draft_length,
            "scoring": self.scoring,
        }


def _rule_to_dict(rule: RuleSpec) -> dict:
    if rule.name == "weighted_ensemble":
        return {"name": rule.name, "weights": dict(rule.weights)}
    if rule.name == "contrastive":
        return {"name": rule.name, "expert": rule.expert, "amateur": rule.amateur, "mu": rule.mu}
    if rule.name == "cosd":
        out = {"name": rule.name, "draft": rule.draft, "assistant": rule.assistant, "verifier": rule.verifier}
        out.update({"tree": rule.tree} if rule.verifier == "tree" else {"alpha": rule.alpha, "beta": rule.beta})
        return out
    return {"name": rule.name, "function": rule.function, "inputs": rule.inputs, "params": dict(rule.params)}


# ---------------------------------------------------------------------------- loading

def load_config(source: str | os.PathLike | Mapping[str, Any]) -> CoSConfig:
    """Load from a YAML file path, a YAML/JSON string, or a mapping."""
    base_dir = Path.cwd()
    if isinstance(source, Mapping):
        raw = source
    else:
        text, base_dir = _read_source(source)
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError("<file>", f"not valid YAML: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError("<top level>", f"must be a mapping, got {type(raw).__name__}")
    return _parse(raw, base_dir)


def _read_source(source) -> tuple[str, Path]:
    path = Path(source)
    text = str(source)
    if "\n" not in text and (path.suffix in (".yaml", ".yml", ".json") or path.exists()):
        if not path.is_file():
            raise ConfigError("<file>", f"{text} does not exist")
        return read_file_text(path), path.resolve().parent
    return text, Path.cwd()


def read_file_text(path: Path) -> str:
    """A CoS file's text; unreadable or non-UTF-8 files are a :class:`ConfigError` naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("<file>", f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("<file>", f"{path} is not UTF-8 text (byte {exc.start}); a CoS file is YAML") from None


def _parse(raw: Mapping[str, Any], base_dir: Path) -> CoSConfig:
    _check_keys(raw, "<top level>", required={"models", "rule"},
                optional={"target", "schedule", "proposer", "proposal", "gamma", "served", "draft_length",
                          "scoring"})
    models = _parse_models(raw["models"], base_dir)
    names = [m.name for m in models]
    target = raw.get("target", names[0])
    _check_name(target, names, "target")
    draft_length = _choice(raw.get("draft_length", "fixed"), DRAFT_LENGTHS, "draft_length")
    if _no_gamma_given(raw):  # the default: gamma: auto
        raw = {**raw, "gamma": "auto"}
    if raw.get("gamma") == "auto":
        if "draft_length" in raw and draft_length != "auto":
            raise ConfigError("gamma", f"is 'auto' but draft_length is {draft_length!r}")
        draft_length = "auto"
        models = _apply_gamma_list([1 if m.name == target else AUTO_MAX_GAMMA for m in models],
                                   raw["models"], models, where="gamma")
    elif "gamma" in raw:
        models = _apply_gamma_list(raw["gamma"], raw["models"], models)

    schedule = _choice(raw.get("schedule", "alternate"), SCHEDULES, "schedule")
    proposal = _choice(raw.get("proposal", "tempered"), PROPOSALS, "proposal")
    served = _choice(raw.get("served", "listed"), SERVED_POLICIES, "served")
    scoring = _choice(raw.get("scoring", "lazy"), SCORINGS, "scoring")
    rule = _parse_rule(raw["rule"], names, base_dir)

    proposer = raw.get("proposer")
    if proposer is None:
        proposer = _default_proposer(models, target)
    _check_name(proposer, names, "proposer")

    if schedule == "naive" and models[names.index(proposer)].gamma < 1:
        raise ConfigError(f"models[{names.index(proposer)}].gamma",
                          f"the naive proposer {proposer!r} needs gamma >= 1")
    if schedule == "alternate":
        for i, m in enumerate(models):
            if m.gamma < 1:
                raise ConfigError(f"models[{i}].gamma",
                                  f"schedule 'alternate' needs gamma >= 1 for every model, {m.name!r} has {m.gamma}")
    return CoSConfig(models=tuple(models), rule=rule, target=target, schedule=schedule,
                     proposer=proposer, proposal=proposal, served=served, draft_length=draft_length,
                     scoring=scoring)


def _no_gamma_given(raw: Mapping[str, Any]) -> bool:
    """Neither ``gamma`` nor ``draft_length`` nor any ``models[i].gamma``: ``gamma: auto`` applies."""
    if "gamma" in raw or "draft_length" in raw:
        return False
    return not any(isinstance(m, Mapping) and "gamma" in m for m in raw["models"] or ())


def _apply_gamma_list(value, raw_models: list, models: list[ModelSpec], where: str | None = None) -> list[ModelSpec]:
    """Top-level ``gamma``: one integer for every model, or a list in the order of ``models``
    (``where``: the field to name instead, for ``gamma: auto``)."""
    names = [m.name for m in models]
    if isinstance(value, list):
        if len(value) != len(models):
            raise ConfigError("gamma", f"has {len(value)} entries but models lists {len(models)} "
                                       f"({', '.join(names)}); give one gamma per model, in that order")
        gammas = value
    else:
        gammas = [value] * len(models)
    for i, (g, item) in enumerate(zip(gammas, raw_models)):
        field_name = where or ("gamma" if not isinstance(value, list) else f"gamma[{i}]")
        if isinstance(g, bool) or not isinstance(g, int):
            raise ConfigError(field_name, f"must be an integer (or, top-level, a list of them or 'auto'), got {g!r}")
        _check_gamma_range(g, field_name)
        if isinstance(item, Mapping) and "gamma" in item:
            raise ConfigError(f"models[{i}].gamma", "is also set by the top-level gamma; set it in one place")
    return [ModelSpec(name=m.name, path=m.path, gamma=g, dtype=m.dtype) for m, g in zip(models, gammas)]


def _check_gamma_range(gamma: int, field_name: str) -> None:
    if gamma < 0:
        raise ConfigError(field_name, f"must be >= 0, got {gamma}")
    if gamma > MAX_GAMMA:
        raise ConfigError(field_name, f"must be <= {MAX_GAMMA} (drafts per model and step), got {gamma}")


def _default_proposer(models: list[ModelSpec], target: str) -> str:
    """The first non-target model: the served model is usually the expensive one."""
    for m in models:
        if m.name != target:
            return m.name
    return target


def _parse_models(raw, base_dir: Path) -> list[ModelSpec]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("models", "must be a non-empty list of {name, path, gamma, dtype}")
    if len(raw) < 2:
        raise ConfigError("models", f"collaborative decoding needs at least 2 models, got {len(raw)}")
    models: list[ModelSpec] = []
    seen_names: dict[str, int] = {}
    seen_paths: dict[str, int] = {}
    for i, item in enumerate(raw):
        where = f"models[{i}]"
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, Mapping):
            raise ConfigError(where, f"must be a mapping with a path, got {type(item).__name__}")
        _check_keys(item, where, required={"path"}, optional={"name", "gamma", "dtype"})
        path_value = item["path"]
        if not isinstance(path_value, str) or not path_value:
            raise ConfigError(f"{where}.path", "must be a non-empty string")
        path = Path(os.path.expanduser(path_value))
        if not path.is_absolute():
            path = base_dir / path
        if not path.is_dir():
            raise ConfigError(f"{where}.path", f"model directory {str(path)!r} does not exist")
        path_str = str(path.resolve())
        name = item.get("name", path.resolve().name)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name", "must be a non-empty string")
        gamma = item.get("gamma", 1)
        if isinstance(gamma, bool) or not isinstance(gamma, int):
            raise ConfigError(f"{where}.gamma", f"must be an integer, got {gamma!r}")
        _check_gamma_range(gamma, f"{where}.gamma")
        dtype = _choice(item.get("dtype", "auto"), DTYPES, f"{where}.dtype")
        if name in seen_names:
            raise ConfigError(f"{where}.name", f"model {name!r} is listed twice (also models[{seen_names[name]}])")
        if path_str in seen_paths:
            raise ConfigError(f"{where}.path", f"{path_str!r} is listed twice (also models[{seen_paths[path_str]}])")
        seen_names[name], seen_paths[path_str] = i, i
        models.append(ModelSpec(name=name, path=path_str, gamma=gamma, dtype=dtype))
    return models


def _parse_rule(raw, names: list[str], base_dir: Path) -> RuleSpec:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError("rule", f"must be a mapping with a name, got {type(raw).__name__}")
    if "name" not in raw:
        raise ConfigError("rule.name", f"missing ({' | '.join(RULE_NAMES)})")
    name = raw["name"]
    if name == "weighted_ensemble":
        _check_keys(raw, "rule", required={"name"}, optional={"weights"})
        return RuleSpec(name=name, weights=_parse_weights(raw.get("weights"), names))
    if name == "contrastive":
        _check_keys(raw, "rule", required={"name", "expert", "amateur", "mu"}, optional=set())
        expert, amateur = raw["expert"], raw["amateur"]
        _check_name(expert, names, "rule.expert")
        _check_name(amateur, names, "rule.amateur")
        if expert == amateur:
            raise ConfigError("rule.amateur", f"must differ from rule.expert ({expert!r})")
        mu = _number(raw["mu"], "rule.mu")
        if mu < 0:
            raise ConfigError("rule.mu", f"must be >= 0, got {mu}")
        return RuleSpec(name=name, expert=expert, amateur=amateur, mu=mu)
    if name == "custom":
        _check_keys(raw, "rule", required={"name", "function", "inputs"}, optional={"params"})
        function = raw["function"]
        if not isinstance(function, str) or function.count(":") != 1:
            raise ConfigError("rule.function", f"must be an import path 'module:function', got {function!r}")
        from vllm_cos.combine import load_function

        try:
            load_function(function)
        except ValueError as exc:
            raise ConfigError("rule.function", str(exc)) from None
        inputs = _choice(raw["inputs"], CUSTOM_INPUTS, "rule.inputs")
        params = raw.get("params", {})
        if not isinstance(params, Mapping):
            raise ConfigError("rule.params", f"must be a mapping, got {type(params).__name__}")
        return RuleSpec(name=name, function=function, inputs=inputs, params=dict(params))
    if name == "cosd":
        return _parse_cosd(raw, names, base_dir)
    raise ConfigError("rule.name", f"unknown rule {name!r} ({' | '.join(RULE_NAMES)})")


def _parse_cosd(raw: Mapping, names: list[str], base_dir: Path) -> RuleSpec:
    """CoSD: a deterministic token choice between a draft and an assistant model."""
    _check_keys(raw, "rule", required={"name", "draft", "assistant"},
                optional={"verifier", "alpha", "beta", "tree"})
    if len(names) != 2:
        raise ConfigError("models", f"rule cosd needs exactly two models (draft and assistant), got {len(names)}")
    draft, assistant = raw["draft"], raw["assistant"]
    _check_name(draft, names, "rule.draft")
    _check_name(assistant, names, "rule.assistant")
    if draft == assistant:
        raise ConfigError("rule.assistant", f"must differ from rule.draft ({draft!r})")
    verifier = _choice(raw.get("verifier", "rule"), COSD_VERIFIERS, "rule.verifier")
    if verifier == "rule":
        if "tree" in raw:
            raise ConfigError("rule.tree", "only with verifier: tree")
        alpha = _number(raw.get("alpha", RuleSpec.alpha), "rule.alpha")
        if not 0.0 < alpha <= 1.0:
            raise ConfigError("rule.alpha", f"must be in (0, 1], got {alpha:g}")
        beta = _number(raw.get("beta", RuleSpec.beta), "rule.beta")
        if not beta > 0.0 or not math.isfinite(beta):
            raise ConfigError("rule.beta", f"must be a finite number > 0, got {beta:g}")
        return RuleSpec(name="cosd", draft=draft, assistant=assistant, verifier=verifier, alpha=alpha, beta=beta)
    for key in ("alpha", "beta"):
        if key in raw:
            raise ConfigError(f"rule.{key}", "only with verifier: rule (a tree has its own thresholds)")
    if "tree" not in raw:
        raise ConfigError("rule.tree", "missing (verifier: tree needs the tree's JSON file)")
    return RuleSpec(name="cosd", draft=draft, assistant=assistant, verifier=verifier,
                    tree=_load_cosd_tree(raw["tree"], base_dir))


def _load_cosd_tree(value, base_dir: Path) -> str:
    """The resolved path of a valid tree JSON (relative paths: against the YAML file's folder)."""
    if not isinstance(value, str) or not value:
        raise ConfigError("rule.tree", f"must be the path of a tree JSON file, got {value!r}")
    path = Path(os.path.expanduser(value))
    path = (path if path.is_absolute() else base_dir / path).resolve()
    from vllm_cos.cosd import TreeError, load_tree

    try:
        load_tree(path)
    except TreeError as exc:
        raise ConfigError("rule.tree", str(exc)) from None
    return str(path)


def _parse_weights(raw, names: list[str]) -> dict[str, float]:
    if raw is None:
        return {n: 1.0 / len(names) for n in names}
    if isinstance(raw, list):
        if len(raw) != len(names):
            raise ConfigError("rule.weights", f"has {len(raw)} entries for {len(names)} models")
        raw = dict(zip(names, raw))
    if not isinstance(raw, Mapping):
        raise ConfigError("rule.weights", f"must be a mapping model -> weight or a list, got {type(raw).__name__}")
    for key in raw:
        _check_name(key, names, f"rule.weights.{key}")
    weights = {n: _number(raw.get(n, 0.0), f"rule.weights.{n}") for n in names}
    for n, w in weights.items():
        if w < 0:
            raise ConfigError(f"rule.weights.{n}", f"must be >= 0, got {w}")
    total = sum(weights.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ConfigError("rule.weights", f"must sum to 1, got {total:g}")
    return weights


# ---------------------------------------------------------------------------- helpers

def _check_keys(raw: Mapping, where: str, required: set[str], optional: set[str]) -> None:
    for key in raw:
        if key not in required and key not in optional:
            allowed = ", ".join(sorted(required | optional))
            raise ConfigError(f"{where}.{key}" if where != "<top level>" else str(key),
                              f"unknown key (allowed: {allowed})")
    for key in sorted(required):
        if key not in raw:
            raise ConfigError(f"{where}.{key}" if where != "<top level>" else key, "missing")


def _check_name(value, names: list[str], where: str) -> None:
    if value not in names:
        raise ConfigError(where, f"{value!r} is not one of the models ({', '.join(names)})")


def _choice(value, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise ConfigError(where, f"must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(where, f"must be a number, got {value!r}")
    return float(value)
