import textwrap

import pytest

from vllm_cos.config import ConfigError, load_config


@pytest.fixture
def model_dirs(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    return tmp_path


def base(model_dirs, **overrides):
    raw = {
        "models": [{"name": "a", "path": str(model_dirs / "a"), "gamma": 1},
                   {"name": "b", "path": str(model_dirs / "b"), "gamma": 3}],
        "rule": {"name": "weighted_ensemble", "weights": {"a": 0.5, "b": 0.5}},
        "schedule": "alternate",
    }
    raw.update(overrides)
    return raw


def test_valid_config_and_defaults(model_dirs):
    cfg = load_config(base(model_dirs))
    assert cfg.model_names == ("a", "b")
    assert cfg.target == "a" and cfg.proposer == "b"  # proposer defaults to the first non-target
    assert cfg.gammas == (1, 3)
    assert cfg.proposal == "tempered"
    assert cfg.served == "listed"  # vLLM refuses a served model the file does not list
    assert cfg.scoring == "lazy"  # a draft-group member done drafting skips the step's later passes
    assert load_config(base(model_dirs, scoring="every_pass")).scoring == "every_pass"
    assert load_config(cfg.to_dict()) == cfg
    assert load_config(base(model_dirs, served="join")).served == "join"
    with pytest.raises(Exception):
        cfg.schedule = "naive"  # frozen


def test_yaml_file_with_relative_paths(model_dirs):
    path = model_dirs / "cos.yaml"
    path.write_text(textwrap.dedent("""
        models:
          - {name: a, path: a, gamma: 2}
          - {name: b, path: ./b}
        rule: {name: contrastive, expert: a, amateur: b, mu: 0.1}
        schedule: naive
        proposer: a
    """))
    cfg = load_config(path)
    assert cfg.models[0].path == str((model_dirs / "a").resolve())
    assert cfg.models[1].gamma == 1
    assert cfg.rule.mu == 0.1 and cfg.rule.expert == "a"


def test_weights_as_list_and_default_equal(model_dirs):
    cfg = load_config(base(model_dirs, rule={"name": "weighted_ensemble", "weights": [0.25, 0.75]}))
    assert dict(cfg.rule.weights) == {"a": 0.25, "b": 0.75}
    cfg = load_config(base(model_dirs, rule={"name": "weighted_ensemble"}))
    assert dict(cfg.rule.weights) == {"a": 0.5, "b": 0.5}


def test_custom_rule(model_dirs):
    cfg = load_config(base(model_dirs, rule={"name": "custom", "function": "torch:maximum", "inputs": "probs"}))
    assert cfg.rule.function == "torch:maximum"


def test_top_level_gamma_list_and_integer(model_dirs):
    raw = base(model_dirs)
    for m in raw["models"]:
        m.pop("gamma", None)
    assert load_config({**raw, "gamma": [2, 5]}).gammas == (2, 5)
    assert load_config({**raw, "gamma": 4}).gammas == (4, 4)
    assert load_config(load_config({**raw, "gamma": [2, 5]}).to_dict()).gammas == (2, 5)


def _cosd(**rule) -> dict:
    return {"name": "cosd", "draft": "b", "assistant": "a", **rule}


def test_cosd_rule_defaults_and_round_trip(model_dirs):
    cfg = load_config(base(model_dirs, rule=_cosd(), schedule="naive", proposer="b"))
    assert (cfg.rule.draft, cfg.rule.assistant, cfg.rule.verifier) == ("b", "a", "rule")
    assert (cfg.rule.alpha, cfg.rule.beta, cfg.rule.tree) == (0.5, 0.5, None)
    assert cfg.to_dict()["rule"] == {"name": "cosd", "draft": "b", "assistant": "a", "verifier": "rule",
                                     "alpha": 0.5, "beta": 0.5}
    assert load_config(cfg.to_dict()) == cfg
    tuned = load_config(base(model_dirs, rule=_cosd(alpha=1, beta=2.5)))
    assert (tuned.rule.alpha, tuned.rule.beta) == (1.0, 2.5) and load_config(tuned.to_dict()) == tuned


def _error(raw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    return info.value


@pytest.mark.parametrize("mutate, field, words", [
    (lambda r: r.update(colour="red"), "colour", "unknown key"),
    (lambda r: r["models"][0].update(gama=2), "models[0].gama", "unknown key"),
    (lambda r: r["rule"].update(weigths=[1]), "rule.weigths", "unknown key"),
    (lambda r: r["models"][1].update(gamma="3"), "models[1].gamma", "must be an integer"),
    (lambda r: r["models"][1].update(gamma=2.5), "models[1].gamma", "must be an integer"),
    (lambda r: r["models"][1].update(gamma=-1), "models[1].gamma", "must be >= 0"),
    (lambda r: r["models"][1].update(gamma=33), "models[1].gamma", "must be <= 32"),
    (lambda r: (r.update(gamma=10**18), [m.pop("gamma", None) for m in r["models"]]), "gamma", "must be <= 32"),
    (lambda r: r["models"][0].update(dtype="int4"), "models[0].dtype", "must be one of"),
    (lambda r: r["models"][1].update(path="/nonexistent/model"), "models[1].path", "does not exist"),
    (lambda r: r["models"][1].update(path=7), "models[1].path", "non-empty string"),
    (lambda r: r["models"][1].update(name="a"), "models[1].name", "listed twice"),
    (lambda r: r["models"][1].update(name="x", path=r["models"][0]["path"]), "models[1].path", "listed twice"),
    (lambda r: r.update(models=r["models"][:1]), "models", "at least 2"),
    (lambda r: r.update(models="a,b"), "models", "non-empty list"),
    (lambda r: r.pop("rule"), "rule", "missing"),
    (lambda r: r["rule"].update(weights={"a": 0.5, "b": 0.6}), "rule.weights", "must sum to 1"),
    (lambda r: r["rule"].update(weights={"a": 1.5, "b": -0.5}), "rule.weights.b", "must be >= 0"),
    (lambda r: r["rule"].update(weights={"a": 0.5, "zz": 0.5}), "rule.weights.zz", "not one of the models"),
    (lambda r: r["rule"].update(weights=[1.0]), "rule.weights", "1 entries for 2 models"),
    (lambda r: r["rule"].update(weights={"a": "half", "b": 0.5}), "rule.weights.a", "must be a number"),
    (lambda r: r.update(rule={"name": "median"}), "rule.name", "unknown rule"),
    (lambda r: r.update(rule={"weights": [0.5, 0.5]}), "rule.name", "missing"),
    (lambda r: r.update(rule={"name": "contrastive", "expert": "a", "amateur": "a", "mu": 0.1}), "rule.amateur", "must differ"),
    (lambda r: r.update(rule={"name": "contrastive", "expert": "a", "amateur": "q", "mu": 0.1}), "rule.amateur", "not one of"),
    (lambda r: r.update(rule={"name": "contrastive", "expert": "a", "amateur": "b", "mu": -1}), "rule.mu", ">= 0"),
    (lambda r: r.update(rule={"name": "contrastive", "expert": "a", "amateur": "b"}), "rule.mu", "missing"),
    (lambda r: r.update(rule={"name": "custom", "function": "os.path.join", "inputs": "probs"}), "rule.function", "module:function"),
    (lambda r: r.update(rule={"name": "custom", "function": "no_such_mod:f", "inputs": "probs"}), "rule.function", "cannot import"),
    (lambda r: r.update(rule={"name": "custom", "function": "torch:no_such_fn", "inputs": "probs"}), "rule.function", "no attribute"),
    (lambda r: r.update(rule={"name": "custom", "function": "torch:maximum", "inputs": "logprobs"}), "rule.inputs", "must be one of"),
    (lambda r: r.update(rule={"name": "custom", "function": "torch:maximum"}), "rule.inputs", "missing"),
    (lambda r: r.update(rule=_cosd(draft="a")), "rule.assistant", "must differ from rule.draft"),
    (lambda r: r.update(rule=_cosd(draft="zz")), "rule.draft", "not one of"),
    (lambda r: r.update(rule={"name": "cosd", "draft": "b"}), "rule.assistant", "missing"),
    (lambda r: r.update(rule=_cosd(alpha=0)), "rule.alpha", "must be in (0, 1]"),
    (lambda r: r.update(rule=_cosd(alpha=1.5)), "rule.alpha", "must be in (0, 1]"),
    (lambda r: r.update(rule=_cosd(beta=0)), "rule.beta", "> 0"),
    (lambda r: r.update(rule=_cosd(beta="big")), "rule.beta", "must be a number"),
    (lambda r: r.update(rule=_cosd(verifier="forest")), "rule.verifier", "must be one of rule, tree"),
    (lambda r: r.update(rule=_cosd(verifier="tree", alpha=0.3)), "rule.alpha", "only with verifier: rule"),
    (lambda r: r.update(rule=_cosd(verifier="tree")), "rule.tree", "missing"),
    (lambda r: r.update(rule=_cosd(gamma=3)), "rule.gamma", "unknown key"),
    (lambda r: (r["models"].append({"name": "c", "path": r["models"][0]["path"][:-1] + "c"}), r.update(rule=_cosd())),
     "models", "exactly two models"),
    (lambda r: r.update(schedule="speculative"), "schedule", "must be one of"),
    (lambda r: r.update(target="zz"), "target", "not one of"),
    (lambda r: r.update(proposer="zz"), "proposer", "not one of"),
    (lambda r: r.update(proposal="greedy"), "proposal", "must be one of"),
    (lambda r: r.update(served="always"), "served", "must be one of listed, join"),
    (lambda r: r.update(scoring="eager"), "scoring", "must be one of lazy, every_pass"),
    (lambda r: r["models"][0].update(gamma=0), "models[0].gamma", "alternate"),
    (lambda r: (r.update(gamma=[1, 2, 3]), [m.pop("gamma", None) for m in r["models"]]), "gamma", "has 3 entries but models lists 2"),
    (lambda r: (r.update(gamma=[1, "2"]), [m.pop("gamma", None) for m in r["models"]]), "gamma[1]", "must be an integer"),
    (lambda r: (r.update(gamma=-1), [m.pop("gamma", None) for m in r["models"]]), "gamma", "must be >= 0"),
    (lambda r: r.update(gamma=[1, 2]), "models[0].gamma", "also set by the top-level gamma"),
    (lambda r: (r.update(schedule="naive", proposer="b"), r["models"][1].update(gamma=0)), "models[1].gamma", "naive proposer"),
])
def test_every_config_error_names_its_field(model_dirs, mutate, field, words):
    raw = base(model_dirs)
    mutate(raw)
    err = _error(raw)
    assert err.field == field
    assert words in str(err)
    assert str(err).startswith(f"cos config: {field}: ")


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [a, b\nrule: {")
    assert _error(bad).field == "<file>"
    assert "does not exist" in str(_error(tmp_path / "missing.yaml"))
    assert "must be a mapping" in str(_error("- just\n- a list\n"))


def test_standard_schedule_allows_zero_gammas(model_dirs):
    raw = base(model_dirs, schedule="standard")
    raw["models"][0]["gamma"] = 0
    raw["models"][1]["gamma"] = 0
    assert load_config(raw).schedule == "standard"
