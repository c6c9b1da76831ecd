"""The main job: a short CoS generation on the tiny models.

    python -m vllm_cos.demo --models models/tiny [--schedule alternate] [--rule weighted_ensemble]

Prints the generated text, tokens/s, forwards per model and acceptance figures of CoS
next to standard collaborative decoding (every model every token) for the same prompts.
``--backend vllm`` (default) runs both inside vLLM (the served model is the first name; the
CoS configuration goes in as ``speculative_config``); ``--backend reference`` runs the plain
PyTorch/transformers reference decoder instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vllm_cos.config import load_config
from vllm_cos.offline import shutdown_llm

PROMPTS = [
    "def fibonacci(n):\n    ",
    "import os\nimport sys\n\n",
    "class Stack:\n    def __init__(self):\n        ",
    "for i in range(10):\n    ",
]


def demo_config(models_dir: Path, rule: str, schedule: str, names=("large", "small")) -> dict:
    models = [{"name": n, "path": str(models_dir / n), "gamma": 1 if i == 0 else 4} for i, n in enumerate(names)]
    if rule == "contrastive":
        rule_spec = {"name": "contrastive", "expert": names[0], "amateur": names[1], "mu": 0.1}
    else:
        rule_spec = {"name": "weighted_ensemble", "weights": {n: 1 / len(names) for n in names}}
    return {"models": models, "target": names[0], "rule": rule_spec, "schedule": schedule}


def run_reference(raw_config: dict, prompts: list[str], max_tokens: int, temperature: float, seed: int):
    from transformers import AutoTokenizer

    from vllm_cos.reference import CausalLM, ReferenceDecoder, SamplingSpec

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


def run_vllm(raw_config: dict, prompts: list[str], max_tokens: int, temperature: float, seed: int):
    import os
    import time

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from vllm_cos.offline import cos_stats

    config = load_config(raw_config)
    target = config.models[config.index(config.target)]
    rows = []
    text = []
    for schedule in ("standard", config.schedule):
        llm = LLM(model=target.path, speculative_config={**raw_config, "schedule": schedule},
                  dtype="float32", enforce_eager=True, max_model_len=512, gpu_memory_utilization=0.2,
                  seed=seed, enable_prefix_caching=False)
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i)
                  for i in range(len(prompts))]
        llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        stats_before = cos_stats(llm)[0] if schedule != "standard" else None
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        stats = None
        if stats_before is not None:
            after = cos_stats(llm)[0]
            stats = {k: after[k] - stats_before.get(k, 0) for k in after if isinstance(after[k], int)}
        rows.append((schedule, tokens, seconds, stats))
        text = [o.outputs[0].text for o in outputs]
        shutdown_llm(llm)
        del llm
    print(f"\nvLLM, models: {', '.join(config.model_names)} (served: {config.target}), rule: {config.rule.name}")
    for schedule, tokens, seconds, stats in rows:
        print(f"\n=== {schedule} ===")
        print(f"tokens/s: {tokens / seconds:.1f} ({tokens} tokens in {seconds:.2f} s)")
        if stats:
            steps = max(1, stats.get("steps", 0))
            proposed = stats.get("drafts_proposed", 0) + stats.get("served_proposed", 0)
            accepted = stats.get("drafts_accepted", 0) + stats.get("served_accepted", 0)
            print(f"engine steps (= {config.target} forwards): {stats.get('steps', 0)}, "
                  f"other model forwards: {stats.get('draft_forwards', 0)}; tokens per step "
                  f"({len(prompts)} requests batched): {stats.get('tokens_emitted', 0) / steps:.2f}")
            if proposed:
                print(f"acceptance: {accepted}/{proposed} proposed tokens accepted ({accepted / proposed:.1%})")
    print("\n--- text ---")
    for prompt, completion in zip(prompts, text):
        print(repr(prompt + completion))


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
    for prompt, out in zip(prompts, final):
        print(repr(prompt + tokenizer.decode(out.token_ids)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models/tiny"),
                        help="directory holding the collaborating models (default: models/tiny)")
    parser.add_argument("--names", default="large,small", help="comma-separated model folders (first = target)")
    parser.add_argument("--rule", default="weighted_ensemble", choices=["weighted_ensemble", "contrastive"])
    parser.add_argument("--schedule", default="alternate", choices=["naive", "alternate"])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="vllm", choices=["vllm", "reference"])
    args = parser.parse_args(argv)
    if not args.models.is_dir():
        parser.error(f"--models: {args.models} is not a directory (build the tiny models: make models)")
    raw = demo_config(args.models, args.rule, args.schedule, tuple(args.names.split(",")))
    if args.backend == "vllm":
        run_vllm(raw, PROMPTS, args.max_tokens, args.temperature, args.seed)
    else:
        tokenizer, config, results = run_reference(raw, PROMPTS, args.max_tokens, args.temperature, args.seed)
        report(tokenizer, config, results, PROMPTS)


if __name__ == "__main__":
    main()
