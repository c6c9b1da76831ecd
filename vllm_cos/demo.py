"""The main job: a short CoS generation on the tiny models.

    python -m vllm_cos.demo --models models/tiny [--schedule alternate] [--rule weighted_ensemble]

Prints the generated text, tokens/s, forwards per model and acceptance figures of CoS
next to standard collaborative decoding (every model every token) for the same prompts.
``--backend reference`` runs the plain PyTorch/transformers reference decoder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vllm_cos.config import load_config

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
    parser.add_argument("--backend", default="reference", choices=["reference"])
    args = parser.parse_args(argv)
    if not args.models.is_dir():
        parser.error(f"--models: {args.models} is not a directory (build the tiny models: make models)")
    raw = demo_config(args.models, args.rule, args.schedule, tuple(args.names.split(",")))
    tokenizer, config, results = run_reference(raw, PROMPTS, args.max_tokens, args.temperature, args.seed)
    report(tokenizer, config, results, PROMPTS)


if __name__ == "__main__":
    main()
