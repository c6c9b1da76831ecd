#!/usr/bin/env python3
"""Where does one CoS engine step spend its time?  cProfile of batch-1 generation on one engine.

    python scripts/bench_profile.py --models /work/shared/models --schedule alternate --rule we
    python scripts/bench_profile.py --schedule standard  # the baseline's step

Prints the cumulative time of the step's parts (model forwards of the served and the draft
model, CoS sampling/verification, the draft proposer's bookkeeping, the scheduler, output
processing) per engine step, and the top functions by own time.  Same performance environment
as the bench (re-exec with LD_PRELOAD / OMP threads).
"""

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_cos import bench  # noqa: E402

PARTS = [  # (label, substring of "file:function" to match in cumulative stats)
    ("engine step (EngineCore.step)", "core.py:step"),
    ("scheduler.schedule", "scheduler.py:schedule"),
    ("model runner execute_model", "gpu_model_runner.py:execute_model"),
    ("sample_tokens", "gpu_model_runner.py:sample_tokens"),
    ("CoS samplers (plain + rejection)", "samplers.py:__call__"),
    ("draft proposer propose", "proposer.py:propose"),
    ("draft group forwards (in propose)", "proposer.py:_forward"),
    ("draft group logits (in propose)", "member_stack.py:member_logits"),
    ("verify (math)", "verify.py:verify"),
    ("LlamaForCausalLM/LlamaModel forwards (nested)", "llama.py:forward"),
    ("CoS standard wrapper forward", "member_stack.py:forward"),
    ("attention (cpu_attn)", "cpu_attn.py:forward"),
    ("scheduler.update_from_output", "scheduler.py:update_from_output"),
    ("output processor", "output_processor.py:process_outputs"),
]


def _cumulative(stats, key: str) -> tuple[int, float]:
    """(calls, cumulative seconds) of the functions ``file:function`` in a profile."""
    file_part, func = key.split(":")
    calls = cum = 0
    for (file, _, f), (cc, nc, tt, ct, callers) in stats.stats.items():
        if f == func and file.endswith(file_part):
            calls += nc
            cum += ct
    return calls, cum


def _cumulative_from(stats, key: str, caller_file: str) -> float:
    """Cumulative seconds of ``file:function`` in calls made directly from functions of
    ``caller_file`` (the proposer's own calls, not those inside a fused served forward)."""
    file_part, func = key.split(":")
    return sum(edge[3] for (file, _, f), (*_, callers) in stats.stats.items()
               if f == func and file.endswith(file_part)
               for (c_file, _, _), edge in callers.items() if c_file.endswith(caller_file))


# --timers: wall-clock per call of these (module, class or None, attribute), no profiler overhead
TIMED = [("vllm.v1.core.sched.scheduler", "Scheduler", "schedule"),
         ("vllm.v1.core.sched.scheduler", "Scheduler", "update_from_output"),
         ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "execute_model"),
         ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_update_states"),
         ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_prepare_inputs"),
         ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_model_forward"),
         ("vllm_cos.adapters.fusion", None, "group_logits_at_last_tokens"),
         ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "sample_tokens"),
         ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_sample"),
         ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_bookkeeping_sync"),
         ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "propose_draft_token_ids"),
         ("vllm_cos.adapters.member_stack", "CoSMemberStack", "forward"),
         ("vllm_cos.adapters.member_stack", "CoSMemberStack", "member_logits"),
         ("vllm.model_executor.models.llama", "LlamaModel", "forward"),
         ("vllm.model_executor.models.llama", "LlamaForCausalLM", "compute_logits")]


PROPOSE = "GPUModelRunner.propose_draft_token_ids"
IN_PROPOSE = ("CoSMemberStack.forward", "CoSMemberStack.member_logits")  # the draft group's model compute
IN_PROPOSE_SUFFIX = " (in propose)"


def _per_model(label: str, args: tuple) -> str:
    """LlamaModel.forward per model (by its layer count and width): the served model's forward and
    a collaborator's are told apart."""
    model = args[0] if args else None
    layers, embed = getattr(model, "layers", None), getattr(model, "embed_tokens", None)
    if label != "LlamaModel.forward" or layers is None or embed is None:
        return label
    return f"{label} [{len(layers)} layers, {getattr(embed, 'embedding_dim', '?')} wide]"


def _install_timers() -> dict:
    """Wrap TIMED with wall-clock accumulators: {label: [calls, seconds]}."""
    import functools
    import importlib

    totals, inside = {}, []  # inside: the labels of the timed calls now running (outermost first)
    for module_name, class_name, attr in TIMED:
        owner = importlib.import_module(module_name)
        owner = getattr(owner, class_name) if class_name else owner
        stock = getattr(owner, attr)
        label = f"{class_name or module_name.rsplit('.', 1)[-1]}.{attr}"
        totals[label] = [0, 0.0]

        def timed(*a, _stock=stock, _label=label, **kw):
            start = time.perf_counter()
            inside.append(_label)
            try:
                return _stock(*a, **kw)
            finally:
                inside.pop()
                elapsed = time.perf_counter() - start
                name = _per_model(_label, a)
                if PROPOSE in inside and _label in IN_PROPOSE:
                    name += IN_PROPOSE_SUFFIX
                total = totals.setdefault(name, [0, 0.0])
                total[0] += 1
                total[1] += elapsed

        setattr(owner, attr, functools.wraps(stock)(timed))
    return totals


def _run_timed(llm, args, prompts) -> None:
    totals = _install_timers()
    tokens, wall, _ = bench.generate_timed(llm, prompts, args.batch, args.temperature, args.max_tokens)
    steps = totals["GPUModelRunner.execute_model"][0] or 1
    print(f"{args.schedule} gamma={args.gamma} drafts={args.drafts} B={args.batch}: {tokens} tokens in {wall:.3f} s "
          f"= {tokens / wall:.1f} tok/s; {steps} engine steps, {1000 * wall / steps:.3f} ms/step")
    for label, (calls, seconds) in totals.items():
        if calls:
            print(f"  {label:45s} {calls:6d} calls {1000 * seconds / steps:8.3f} ms/step")
    if args.schedule in ("naive", "alternate"):
        seconds = {label: total[1] for label, total in totals.items()}
        outside = (seconds["GPUModelRunner._sample"] + seconds.get(PROPOSE, 0.0)
                   - sum(seconds.get(label + IN_PROPOSE_SUFFIX, 0.0) for label in IN_PROPOSE))
        print(f"CoS work outside model forwards (_sample + propose_draft_token_ids - the group's forwards and "
              f"logits in it): {1000 * outside / steps:.3f} ms/step = {100 * outside / wall:.1f}% of the step")


def _cos_spec(models, rule, schedule, gamma: str, three: bool = False) -> dict:
    if gamma != "auto":
        return bench.cos_spec(models, rule, schedule, int(gamma), three)
    spec = bench.cos_spec(models, rule, schedule, 1, three)
    for entry in spec["models"]:
        entry.pop("gamma")
    return {**spec, "gamma": "auto"}


def _force_draft_length(k: int) -> None:
    """Every step drafts k tokens (gamma: auto's controller overridden; in-process engine only)."""
    from vllm_cos.adaptive import DraftLengthController

    DraftLengthController.choose = lambda self, batch: min(k, self.max_drafts)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="/work/shared/models")
    p.add_argument("--target", default="large")
    p.add_argument("--small", default="small")
    p.add_argument("--schedule", default="alternate", choices=["standard", "naive", "alternate", "single", "sd"])
    p.add_argument("--rule", default="we", choices=["we", "cd", "we3"],
                   help="we3: WE with three equal weights (--target, --small and the bench's third model)")
    p.add_argument("--gamma", default="3", help="draft tokens of the small model per step, or 'auto'")
    p.add_argument("--drafts", type=int, default=None,
                   help="with --gamma auto: force every step to draft this many tokens (0 = verify only)")
    p.add_argument("--scoring", choices=["lazy", "every_pass"], default=None,
                   help="the CoS file's scoring (default: the file's default, lazy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--no-reexec", action="store_true")
    p.add_argument("--save", help="write the raw cProfile stats to this file (pstats / snakeviz)")
    p.add_argument("--timers", action="store_true",
                   help="no profiler: wall-clock ms per engine step of the runner's parts (in-process engine)")
    args = p.parse_args(argv)
    if not args.no_reexec and os.environ.get(bench.REEXEC_FLAG) != "1":
        env, warnings = bench.performance_env(args.threads)
        for w in warnings:
            print("warning:", w, file=sys.stderr)
        os.execve(sys.executable, [sys.executable, __file__, *(argv or sys.argv[1:])], env)
    settings, _ = bench.parse_args(["--models", args.models, "--target", args.target, "--small", args.small,
                                    "--batch-sizes", str(args.batch)])
    models = bench._models(settings)
    three = args.rule == "we3"
    rule = (bench.we3_rule(models) if three else bench.we_rule(models, 0.5) if args.rule == "we"
            else bench.cd_rule(models, 0.1))
    if args.schedule == "single":
        job = bench.EngineJob("single", "single", "none", "", None, [args.temperature])
    elif args.schedule == "sd":
        job = bench.EngineJob("sd", "sd", "none", "", args.gamma, [args.temperature],
                              spec={"method": "draft_model", "model": models["small"],
                                    "num_speculative_tokens": int(args.gamma)})
    else:
        spec = _cos_spec(models, rule, args.schedule, args.gamma, three)
        if args.scoring is not None:
            spec["scoring"] = args.scoring
        job = bench.EngineJob(args.schedule, args.schedule, args.rule, "", args.gamma, [args.temperature], spec=spec)
    if args.drafts is not None:
        _force_draft_length(args.drafts)
    llm = bench.start_engine(job, models, settings)
    prompts = bench.tokenize_prompts(models, settings)["code"]
    bench.generate_timed(llm, prompts[:1], 1, args.temperature, 8)  # warm-up
    if args.timers:
        bench.generate_timed(llm, prompts if args.batch > 1 else prompts[:1], args.batch, args.temperature, 16)
        return _run_timed(llm, args, prompts[:1] if args.batch == 1 else prompts)
    cos0 = bench.cos_counters(llm)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    tokens, *_ = bench.generate_timed(llm, prompts[:1] if args.batch == 1 else prompts, args.batch,
                                     args.temperature, args.max_tokens)
    prof.disable()
    wall = time.perf_counter() - t0
    cos = bench._diff(bench.cos_counters(llm), cos0)
    stats = pstats.Stats(prof)
    if args.save:
        stats.dump_stats(args.save)
    steps = None
    for (file, _, func), (cc, nc, tt, ct, callers) in stats.stats.items():
        if file.endswith("core.py") and func == "step" and "v1/engine" in file:
            steps = nc
    print(f"{args.schedule} {args.rule} T={args.temperature:g} gamma={args.gamma} B={args.batch}: {tokens} tokens in "
          f"{wall:.2f} s (profiled) = {tokens / wall:.1f} tok/s; engine steps {steps}; cos counters {cos}; "
          f"load {bench.load_average()}")
    print(f"{'part':45s} {'calls':>7s} {'cum s':>8s} {'ms/step':>8s} {'% wall':>7s}")
    cums = {}
    for label, key in PARTS:
        calls, cums[key] = _cumulative(stats, key)
        if calls:
            per_step = 1000 * cums[key] / steps if steps else float("nan")
            print(f"{label:45s} {calls:7d} {cums[key]:8.3f} {per_step:8.2f} {100 * cums[key] / wall:6.1f}%")
    if args.schedule in ("naive", "alternate"):
        _, runner_propose = _cumulative(stats, "fusion.py:propose_draft_token_ids")  # the hooked runner method
        overhead = (cums["samplers.py:__call__"] + runner_propose
                    - cums["proposer.py:_forward"]  # the group's forwards (module calls: no direct caller)
                    - _cumulative_from(stats, "member_stack.py:member_logits", "proposer.py"))
        print(f"CoS overhead (samplers + the runner's propose_draft_token_ids, hooked, without the proposer's group "
              f"forwards and logits): "
              f"{1000 * overhead / steps:.2f} ms/step = {100 * overhead / wall:.1f}% of the step")
    print()
    stats.sort_stats("tottime").print_stats(args.top)
    from vllm_cos.offline import shutdown_llm

    shutdown_llm(llm)


if __name__ == "__main__":
    main()
