"""The main job: CoS next to standard collaborative decoding on the tiny models, in vLLM.

    python -m vllm_cos.demo --models models/tiny [--schedule alternate] [--rule weighted_ensemble]
                            [--gamma N] [--max-tokens 128] [--batch 8] [--log-file PATH]

Starts one engine for ``standard`` (every model scores every token) and then one for the CoS
schedule (``gamma: auto`` unless ``--gamma N``), never both at once; each is warmed up before it
is timed at batch 1 (requests one at a time) and at batch 8 (8 requests in one ``generate``
call). Prints a table (tokens/s of both, their ratio, CoS acceptance and tokens per
verification round) and the text of two prompts; vLLM's own log goes to ``--log-file``
(default: ``vllm-cos-demo.log`` in the system temp dir), whose tail is printed if an engine
fails. ``--backend reference`` runs the plain PyTorch/transformers reference decoder instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from vllm_cos.config import ConfigError, load_config

PROMPTS = [
    "def fibonacci(n):\n    ",
    "def __repr__(self):\n        return ",
    "class Stack:\n    def __init__(self):\n        ",
    "for i in range(10):\n    ",
    "def read_file(path):\n    with open(path) as f:\n        ",
    "if __name__ == \"__main__\":\n    ",
    "try:\n    import json\nexcept ImportError:\n    ",
    "import os\nimport sys\n\n",
]
COLUMNS = ("", "standard tok/s", "CoS tok/s", "ratio", "acceptance", "tokens/round")
LOG_TAIL_LINES = 40


def demo_config(models_dir: Path, rule: str, schedule: str, names=("large", "small"), gamma: int | None = None) -> dict:
    """The CoS file as a dict: ``gamma: auto`` (served model 1, the others up to 4 drafts per step,
    each step choosing its own), or every model but the served one drafting ``gamma``."""
    models = [{"name": n, "path": str(models_dir / n)} for n in names]
    if rule == "contrastive":
        rule_spec = {"name": "contrastive", "expert": names[0], "amateur": names[1], "mu": 0.1}
    else:
        rule_spec = {"name": "weighted_ensemble", "weights": {n: 1 / len(names) for n in names}}
    gammas = "auto" if gamma is None else [1] + [gamma] * (len(names) - 1)
    return {"models": models, "target": names[0], "rule": rule_spec, "schedule": schedule, "gamma": gammas}


def format_table(rows: list[dict]) -> str:
    """Rows ``{"label", "standard", "cos", "acceptance", "tokens_per_round"}`` (tok/s, tok/s, a
    fraction or None, tokens or None) as an aligned text table."""
    cells = [COLUMNS]
    for r in rows:
        ratio = f"{r['cos'] / r['standard']:.2f}x" if r["standard"] else "-"
        acc = "-" if r.get("acceptance") is None else f"{r['acceptance']:.1%}"
        tpr = "-" if r.get("tokens_per_round") is None else f"{r['tokens_per_round']:.2f}"
        cells.append((r["label"], f"{r['standard']:.1f}", f"{r['cos']:.1f}", ratio, acc, tpr))
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def short(text: str, limit: int = 160) -> str:
    text = repr(text)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


def log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def engine_failed(schedule: str, exc: BaseException, log_path: Path) -> SystemExit:
    """What to raise when an engine does not start or run: the reason and the log's tail on stderr."""
    print(f"\ndemo: the {schedule} engine failed: {type(exc).__name__}: {exc}\n--- last {LOG_TAIL_LINES} lines "
          f"of vLLM's log ({log_path}) ---\n{log_tail(log_path)}", file=sys.stderr)
    return SystemExit(1)


def quiet_vllm(log_path: Path) -> None:
    """Before vLLM is imported: its loggers write to ``log_path`` only (at VLLM_LOGGING_LEVEL,
    default INFO), tqdm bars are off, the engine runs in this process."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    level = os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper()
    config = {"version": 1, "disable_existing_loggers": False,
              "formatters": {"plain": {"format": "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"}},
              "handlers": {"file": {"class": "logging.FileHandler", "filename": str(log_path), "mode": "a",
                                    "formatter": "plain", "level": level}},
              "loggers": {"vllm": {"handlers": ["file"], "level": level, "propagate": False}}}
    config_path = log_path.with_name(log_path.name + ".logging.json")
    config_path.write_text(json.dumps(config))
    os.environ.update(VLLM_CONFIGURE_LOGGING="1", VLLM_LOGGING_CONFIG_PATH=str(config_path), TQDM_DISABLE="1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@contextlib.contextmanager
def output_to(log_path: Path):
    """Everything written to file descriptors 1 and 2 (C++ warnings, stray prints, an engine
    process) goes to the log; yields a ``say`` that still reaches the terminal."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w")
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield lambda msg: print(msg, file=terminal, flush=True)
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        for fd, target in zip(saved, (1, 2)):
            os.dup2(fd, target), os.close(fd)
        terminal.close()


def measure(llm, prompts: list[str], batch: int, max_tokens: int, temperature: float, seed: int) -> dict:
    """One timed run: batch 1 = the prompts one request at a time; batch B = B requests (the
    prompts cycled) in one call. Tokens/s, the CoS counters' acceptance and tokens per round."""
    from vllm import SamplingParams

    from vllm_cos.offline import cos_stats

    def params(i):
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i, ignore_eos=True)

    before = cos_stats(llm)[0] or {}
    start = time.perf_counter()
    if batch == 1:
        outputs = [llm.generate([p], params(i), use_tqdm=False)[0] for i, p in enumerate(prompts)]
    else:
        outputs = llm.generate([prompts[i % len(prompts)] for i in range(batch)],
                               [params(i) for i in range(batch)], use_tqdm=False)
    seconds = time.perf_counter() - start
    after = cos_stats(llm)[0] or {}
    c = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], int)}
    proposed = c.get("drafts_proposed", 0) + c.get("served_proposed", 0)
    accepted = c.get("drafts_accepted", 0) + c.get("served_accepted", 0)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
            "acceptance": accepted / proposed if proposed else None,
            "tokens_per_round": c["tokens_emitted"] / c["row_steps"] if c.get("row_steps") else None,
            "text": [o.outputs[0].text for o in outputs]}


def run_engine(raw_config: dict, schedule: str, args, say) -> dict:
    """Start one engine, warm it up at both batch sizes, time batch 1 and batch B, stop it."""
    from vllm import LLM

    from vllm_cos.offline import shutdown_llm

    t0 = time.perf_counter()
    say(f"{schedule}: starting the engine ...")
    llm = LLM(model=raw_config["models"][0]["path"], speculative_config={**raw_config, "schedule": schedule},
              dtype="float32", enforce_eager=True, max_model_len=max(512, args.max_tokens + 128),
              gpu_memory_utilization=0.2, kv_cache_memory_bytes=256 << 20, max_num_seqs=args.batch,
              seed=args.seed, enable_prefix_caching=False, use_tqdm_on_load=False)
    try:
        warm = min(16, args.max_tokens)  # first-call allocations; gamma: auto measures its step costs
        for batch in (1, args.batch):
            measure(llm, PROMPTS[:1], batch, warm, args.temperature, args.seed)
        say(f"{schedule}: warmed up; timing batch 1 ({args.requests} x {args.max_tokens} tokens) ...")
        one = measure(llm, PROMPTS[:args.requests], 1, args.max_tokens, args.temperature, args.seed)
        say(f"{schedule}: timing batch {args.batch} ({args.batch} x {args.max_tokens} tokens) ...")
        many = measure(llm, PROMPTS, args.batch, args.max_tokens, args.temperature, args.seed)
    finally:
        shutdown_llm(llm)
    say(f"{schedule}: done in {time.perf_counter() - t0:.0f} s")
    return {1: one, args.batch: many}


def run_vllm(raw_config: dict, args) -> None:
    log_path = args.log_file
    quiet_vllm(log_path)
    config = load_config(raw_config)
    results = {}
    for schedule in ("standard", config.schedule):
        try:
            with output_to(log_path) as say:
                results[schedule] = run_engine(raw_config, schedule, args, say)
        except Exception as exc:
            raise engine_failed(schedule, exc, log_path) from exc
    std, cos = results["standard"], results[config.schedule]
    gamma = "auto" if args.gamma is None else args.gamma
    print(f"\nvLLM: {', '.join(config.model_names)} (served: {config.target}), rule {config.rule.name}, "
          f"CoS = {config.schedule} with gamma {gamma}; {args.max_tokens} tokens per request, "
          f"temperature {args.temperature:g}\n")
    rows = [{"label": f"batch {b}", "standard": std[b]["tokens_per_s"], "cos": cos[b]["tokens_per_s"],
             "acceptance": cos[b]["acceptance"], "tokens_per_round": cos[b]["tokens_per_round"]}
            for b in (1, args.batch)]
    print(format_table(rows))
    if slower := [r["label"] for r in rows if r["cos"] < r["standard"]]:
        print(f"\nCoS is slower at {' and '.join(slower)}: a tiny model's forward costs little next to a CoS "
              "step's own work,\nso emitting tokens/round tokens per served-model forward does not pay there "
              "(README: Benchmarks).")
    print_text(PROMPTS, cos[1]["text"], std[1]["text"], args.temperature)
    print(f"\nvLLM's log: {log_path}")


def print_text(prompts: list[str], cos_text: list[str], std_text: list[str], temperature: float) -> None:
    print("\n--- text (CoS, first prompts) ---")
    for prompt, text, baseline in list(zip(prompts, cos_text, std_text))[:2]:
        print(short(prompt + text))
        if temperature == 0:
            print("  (standard: the same)" if text == baseline else f"  standard: {short(prompt + baseline)}")


def run_reference(raw_config: dict, prompts: list[str], max_tokens: int, temperature: float, seed: int):
    from transformers import AutoTokenizer

    from vllm_cos.reference import CausalLM, ReferenceDecoder, SamplingSpec

    os.environ.setdefault("TQDM_DISABLE", "1")
    config = load_config(raw_config)
    tokenizer = AutoTokenizer.from_pretrained(config.models[0].path)
    models = [CausalLM.from_pretrained(m.path, m.dtype) for m in config.models]
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    results = {}
    for schedule in ("standard", config.schedule):
        decoder = ReferenceDecoder(load_config({**raw_config, "schedule": schedule}), models)
        specs = [SamplingSpec(max_tokens, temperature, seed=seed + i) for i in range(len(prompts))]
        outputs = decoder.generate(prompt_ids, specs, eos_token_id=tokenizer.eos_token_id)
        results[schedule] = outputs
    return tokenizer, config, results


def report(tokenizer, config, results, prompts) -> None:
    for schedule, outputs in results.items():
        tokens = sum(len(o.token_ids) for o in outputs)
        seconds = outputs[0].stats.seconds
        forwards = [sum(o.stats.forwards[k] for o in outputs) for k in range(len(config.models))]
        accepted = sum(o.stats.accepted for o in outputs)
        verified = sum(o.stats.verified for o in outputs)
        print(f"\n=== {schedule} ({config.rule.name}, models: {', '.join(config.model_names)}) ===")
        print(f"tokens/s: {tokens / seconds:.1f} ({tokens} tokens in {seconds:.2f} s)")
        print("forwards per model: " + ", ".join(f"{n}={f}" for n, f in zip(config.model_names, forwards)))
        print(f"tokens per {config.target} forward: {tokens / max(1, forwards[config.index(config.target)]):.2f}")
        if verified:
            print(f"acceptance: {accepted}/{verified} proposed tokens accepted ({accepted / verified:.1%})")
    final = list(results.values())[-1]
    print("\n--- text ---")
    for prompt, out in list(zip(prompts, final))[:2]:
        print(short(prompt + tokenizer.decode(out.token_ids)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models/tiny"),
                        help="directory holding the collaborating models (default: models/tiny)")
    parser.add_argument("--names", default="large,small", help="comma-separated model folders (first = served)")
    parser.add_argument("--rule", default="weighted_ensemble", choices=["weighted_ensemble", "contrastive"])
    parser.add_argument("--schedule", default="alternate", choices=["naive", "alternate"])
    parser.add_argument("--gamma", type=int, default=None,
                        help="drafts per step of every model but the served one (default: gamma: auto)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default: 128)")
    parser.add_argument("--batch", type=int, default=8, help="requests in the batched run (default: 8)")
    parser.add_argument("--requests", type=int, default=2, help="requests of the batch-1 run (default: 2)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="vllm", choices=["vllm", "reference"])
    parser.add_argument("--log-file", type=Path, default=Path(tempfile.gettempdir()) / "vllm-cos-demo.log",
                        help="where vLLM's log goes (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.models.is_dir():
        parser.error(f"--models: {args.models} is not a directory (build the tiny models: make models)")
    if args.gamma is not None and args.gamma < 1:
        parser.error("--gamma: must be >= 1")
    if args.batch < 2 or not 1 <= args.requests <= len(PROMPTS) or args.max_tokens < 1:
        parser.error(f"need --batch >= 2, 1 <= --requests <= {len(PROMPTS)}, --max-tokens >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    raw = demo_config(args.models, args.rule, args.schedule, tuple(args.names.split(",")), args.gamma)
    try:
        load_config(raw)
    except ConfigError as exc:
        raise SystemExit(f"demo: {exc}") from None
    if args.backend == "vllm":
        run_vllm(raw, args)
    else:
        prompts = PROMPTS[:args.requests]
        tokenizer, config, results = run_reference(raw, prompts, args.max_tokens, args.temperature, args.seed)
        report(tokenizer, config, results, prompts)


if __name__ == "__main__":
    main()
