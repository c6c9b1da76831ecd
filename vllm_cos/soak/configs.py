"""Seeded random mutations of valid cos.yaml files, for the bad-configuration fuzz.

:func:`config_cases` writes ``count`` cases under a work directory, each a cos.yaml (and, for
the file mutations, a copy of one model directory with one file damaged) plus the model path
the user serves.  The mutation kinds: wrong types, missing keys, unknown keys, duplicated
models, wrong paths, corrupt or truncated model files, tokenizers that differ, gamma out of
range or huge, contradictory schedule / proposer / rule fields, broken YAML text, and benign
edits that must still start.  The same (models, seed, count) always gives the same cases.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class ConfigCase:
    index: int
    kind: str
    detail: str  # what was changed
    yaml_path: Path
    served: str  # the model directory the user serves
    damaged: str | None = None  # a damaged model file: the refusal must name it


def base_specs(models: dict[str, Path]) -> list[dict]:
    """Valid specs over the first three models (name -> directory)."""
    (a, pa), (b, pb), (c, pc) = list(models.items())[:3]
    two = [{"name": a, "path": str(pa), "gamma": 1}, {"name": b, "path": str(pb), "gamma": 3}]
    return [
        {"models": two, "rule": {"name": "weighted_ensemble", "weights": {a: 0.5, b: 0.5}},
         "schedule": "alternate"},
        {"models": [dict(m, gamma=2) for m in two],
         "rule": {"name": "contrastive", "expert": a, "amateur": b, "mu": 0.1}, "schedule": "naive",
         "proposer": b},
        {"models": [{"name": n, "path": str(p)} for n, p in ((a, pa), (b, pb), (c, pc))],
         "rule": {"name": "weighted_ensemble", "weights": [0.4, 0.3, 0.3]}, "gamma": "auto"},
        {"models": [{"name": a, "path": str(pa)}, {"name": b, "path": str(pb)}],
         "rule": {"name": "cosd", "draft": b, "assistant": a}, "schedule": "naive", "proposer": b, "gamma": 2},
        {"models": [str(pa), str(pb)], "rule": {"name": "weighted_ensemble", "weights": [0.5, 0.5]},
         "schedule": "standard"},
    ]


WRONG_VALUES = [None, 3, -1, 2.5, "x", "", [], {}, True, [1, 2], {"a": 1}, "auto", 10**9, "large"]
UNKNOWN_KEYS = ["gama", "modle", "schedul", "weight", "temperature", "draft", "verbose", "path2"]


def _nodes(value, prefix=()):
    """Every (path, value) below ``value`` (paths of keys / indices)."""
    out = [(prefix, value)]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _nodes(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _nodes(v, prefix + (i,))
    return out


def _name(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path)) or "<top>"


def _set(spec, path, value):
    node = spec
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def _model_entries(spec) -> list:
    return spec["models"] if isinstance(spec.get("models"), list) else []


def _entry_dict(spec, i: int) -> dict:
    """models[i] as a mapping (a bare path entry becomes {path})."""
    if not isinstance(spec["models"][i], dict):
        spec["models"][i] = {"path": spec["models"][i]}
    return spec["models"][i]


def m_retype(rng, spec, ctx):
    path, _ = rng.choice(_nodes(spec)[1:])
    value = rng.choice(WRONG_VALUES)
    _set(spec, path, value)
    return f"{_name(path)} = {value!r}"


def m_drop(rng, spec, ctx):
    path, _ = rng.choice(_nodes(spec)[1:])
    node = spec
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]
    return f"removed {_name(path)}"


def m_unknown_key(rng, spec, ctx):
    dicts = [p for p, v in _nodes(spec) if isinstance(v, dict)]
    where = rng.choice(dicts)
    node = spec
    for p in where:
        node = node[p]
    key = rng.choice(UNKNOWN_KEYS)
    node[key] = rng.choice(WRONG_VALUES)
    return f"unknown key {_name(where + (key,))}"


def m_duplicate_model(rng, spec, ctx):
    models = _model_entries(spec)
    i = rng.randrange(len(models))
    twin = copy.deepcopy(_entry_dict(spec, i))
    if rng.random() < 0.5 and "name" in twin:
        twin["name"] = twin["name"] + "-again"  # same directory twice
        what = "same path"
    else:
        twin["path"] = str(rng.choice(list(ctx["models"].values())[3:] or list(ctx["models"].values())))
        what = "same name"
    models.insert(rng.randrange(len(models) + 1), twin)
    return f"models[{i}] duplicated ({what})"


def m_bad_path(rng, spec, ctx):
    i = rng.randrange(len(_model_entries(spec)))
    empty = ctx["dir"] / "empty-model"
    empty.mkdir(exist_ok=True)
    choices = [str(ctx["dir"] / "no-such-model"), str(Path(_entry_dict(spec, i)["path"]) / "config.json"),
               str(empty), "", "../nowhere/model", "~/no-such-model-dir"]
    value = rng.choice(choices)
    _entry_dict(spec, i)["path"] = value
    return f"models[{i}].path = {value!r}"


def m_gamma(rng, spec, ctx):
    value = rng.choice([-1, 0, 33, 10**6, 10**18, "3", 2.5, True, [1], "auto", [1, 2, 3, 4, 5, 6]])
    if rng.random() < 0.5:
        spec["gamma"] = value
        return f"gamma = {value!r}"
    i = rng.randrange(len(_model_entries(spec)))
    _entry_dict(spec, i)["gamma"] = value
    return f"models[{i}].gamma = {value!r}"


def m_contradict(rng, spec, ctx):
    names = [m.get("name") if isinstance(m, dict) else Path(m).name for m in _model_entries(spec)]
    first, other = names[0], names[-1]
    edits = [
        ({"schedule": "naive", "proposer": first}, "naive with the served model proposing"),
        ({"proposer": "nobody"}, "proposer not a model"), ({"target": "nobody"}, "target not a model"),
        ({"schedule": rng.choice(["fast", "Alternate", "speculative"])}, "unknown schedule"),
        ({"gamma": "auto", "draft_length": "fixed"}, "gamma auto with draft_length fixed"),
        ({"served": "always"}, "unknown served policy"), ({"proposal": "greedy"}, "unknown proposal"),
        ({"rule": {"name": "weighted_ensemble", "weights": {first: 0.5, "nobody": 0.5}}}, "weights name no model"),
        ({"rule": {"name": "weighted_ensemble", "weights": {first: 0.5, other: 0.2}}}, "weights sum to 0.7"),
        ({"rule": {"name": "contrastive", "expert": first, "amateur": first, "mu": 0.1}}, "expert = amateur"),
        ({"rule": {"name": "contrastive", "expert": first, "amateur": other, "mu": -1}}, "mu < 0"),
        ({"rule": {"name": "custom", "function": "os:getcwd", "inputs": "probs"}}, "custom rule not a rule"),
        ({"rule": {"name": "custom", "function": "__import__('os').system('true')", "inputs": "probs"}},
         "custom rule as code"),
        ({"rule": {"name": "custom", "function": "vllm_cos.rules:geometric_mean", "inputs": "probs",
                   "params": {"power": 2}}}, "custom rule, unknown parameter"),
        ({"rule": {"name": "cosd", "draft": first, "assistant": other, "alpha": 2}}, "cosd alpha > 1"),
        ({"rule": {"name": "cosd", "draft": first, "assistant": other, "verifier": "tree"}}, "cosd tree missing"),
    ]
    edit, what = rng.choice(edits)
    spec.update(copy.deepcopy(edit))
    return what


def m_benign(rng, spec, ctx):
    """Edits that keep the file valid: it must start and serve."""
    choice = rng.randrange(4)
    if choice == 0 and "gamma" not in spec:
        for i in range(1, len(_model_entries(spec))):
            _entry_dict(spec, i)["gamma"] = rng.randint(1, 4)
        return "other models' gamma changed"
    if choice == 1:
        spec["proposal"] = rng.choice(["raw", "tempered"])
        return f"proposal {spec['proposal']}"
    if choice == 2 and spec.get("schedule") != "standard":
        spec["schedule"] = "alternate"
        spec.pop("proposer", None)
        return "schedule alternate"
    spec["served"] = "listed"
    return "served: listed written out"


SPEC_MUTATIONS = {"retype": m_retype, "drop": m_drop, "unknown-key": m_unknown_key,
                  "duplicate-model": m_duplicate_model, "bad-path": m_bad_path, "gamma": m_gamma,
                  "contradict": m_contradict, "benign": m_benign}


def _copy_model(src: Path, dst: Path) -> Path:
    """A copy of a model directory (the weights hard-linked or copied: never damaged in place)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy2(f, dst / f.name)
    return dst


def _truncate(path: Path, rng) -> str:
    data = path.read_bytes()
    path.write_bytes(data[: rng.randrange(len(data))])
    return "truncated"


def _garbage_header(path: Path, rng) -> str:
    data = bytearray(path.read_bytes())
    data[8:40] = bytes(rng.randrange(256) for _ in range(32))
    path.write_bytes(bytes(data))
    return "header overwritten"


def _edit_json(update):
    def damage(path: Path, rng) -> str:
        value = json.loads(path.read_text())
        return update(value, path, rng)
    return damage


def _extra_token(value, path, rng) -> str:
    value["model"]["vocab"]["zz-extra-token"] = len(value["model"]["vocab"])
    path.write_text(json.dumps(value))
    return "one more token (a different tokenizer)"


def _no_model_type(value, path, rng) -> str:
    value.pop("model_type", None)
    path.write_text(json.dumps(value))
    return "model_type removed"


def _small_vocab(value, path, rng) -> str:
    value["vocab_size"] = 16
    path.write_text(json.dumps(value))
    return "vocab_size 16"


# (file, damage); None: delete the file
FILE_DAMAGES = [("model.safetensors", _truncate), ("model.safetensors", _garbage_header),
                ("model.safetensors", None), ("config.json", _truncate), ("config.json", None),
                ("config.json", _edit_json(_no_model_type)), ("config.json", _edit_json(_small_vocab)),
                ("tokenizer.json", _truncate), ("tokenizer.json", _edit_json(_extra_token))]


def damage_model(rng, spec, ctx, case_dir: Path) -> tuple[str, str, str]:
    """Copy one collaborator's directory into the case and damage one file: (detail, file, original dir)."""
    i = rng.randrange(len(_model_entries(spec)))
    entry = _entry_dict(spec, i)
    original = entry["path"]
    copy_dir = _copy_model(Path(original), case_dir / Path(original).name)
    name, damage = rng.choice(FILE_DAMAGES)
    target = copy_dir / name
    what = "deleted" if damage is None else damage(target, rng)
    if damage is None:
        target.unlink()
    entry["path"] = str(copy_dir)
    return f"models[{i}] {name} {what}", str(target), original


def damage_text(rng, text: str) -> tuple[str, str]:
    """Broken YAML text: (text, detail)."""
    choice = rng.randrange(6)
    if choice == 0:
        cut = rng.randrange(len(text))
        return text[:cut], f"file cut at byte {cut}"
    if choice == 1:
        at = rng.randrange(len(text))
        return text[:at] + rng.choice(["\t", ": :", "{", "]", "- -", "\x00", "&x *y"]) + text[at:], "junk inserted"
    if choice == 2:
        return "", "empty file"
    if choice == 3:
        return bytes(rng.randrange(256) for _ in range(64)).decode("latin-1"), "binary garbage"
    if choice == 4:
        return "- " + text.replace("\n", "\n  "), "the mapping made a list"
    return text.replace(":", " ", 1), "first colon removed"


KINDS = [*SPEC_MUTATIONS, "damaged-file", "yaml-text"]


def _served_path(spec, base_served: str) -> str:
    """What the user serves: the target's (or first) entry's directory if it is one, else the original."""
    entries = _model_entries(spec)
    target = spec.get("target")
    for item in entries:
        entry = item if isinstance(item, dict) else {"path": item}
        path = entry.get("path")
        if isinstance(path, str) and Path(path).is_dir() and (target is None or entry.get("name") == target):
            return path
    return base_served


def config_cases(models: dict[str, Path], workdir: Path, count: int = 200, seed: int = 0) -> list[ConfigCase]:
    """``count`` cases under ``workdir`` (kinds cycled, so every kind is covered), seeded."""
    rng = random.Random(seed)
    bases = base_specs(models)
    ctx = {"models": models, "dir": workdir}
    cases = []
    for index in range(count):
        kind = KINDS[index % len(KINDS)]
        spec = copy.deepcopy(rng.choice(bases))
        case_dir = workdir / f"case-{index:03d}"
        case_dir.mkdir(parents=True)
        first = spec["models"][0]
        base_served = first["path"] if isinstance(first, dict) else first
        damaged = None
        if kind == "damaged-file":
            detail, damaged, original = damage_model(rng, spec, ctx, case_dir)
            base_served = str(case_dir / Path(original).name) if original == base_served else base_served
        elif kind != "yaml-text":
            detail = SPEC_MUTATIONS[kind](rng, spec, ctx)
        text = yaml.safe_dump(spec, sort_keys=False)
        if kind == "yaml-text":
            text, detail = damage_text(rng, text)
        yaml_path = case_dir / "cos.yaml"
        yaml_path.write_text(text, encoding="latin-1" if kind == "yaml-text" else "utf-8")
        detail = detail.replace(str(workdir), "<work>")
        cases.append(ConfigCase(index, kind, detail, yaml_path, _served_path(spec, base_served)
                                if kind != "yaml-text" else base_served, damaged))
    return cases
