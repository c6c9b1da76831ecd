"""Engine measurements: start a vLLM engine for a job, time generations, read the spec-decode and
CoS counters into :class:`~vllm_cos.bench.rows.Row`."""

from __future__ import annotations

import time
from dataclasses import dataclass

from vllm_cos.bench.environment import load_average
from vllm_cos.bench.jobs import AUTO, EngineJob, job_measurements
from vllm_cos.bench.rows import Row, _set_timing
from vllm_cos.bench.settings import Settings
from vllm_cos.bench.theory import acceptance_from_counters
from vllm_cos.offline import shutdown_llm

# An explicit KV cache size: the CPU worker's automatic size is "0.2 x RAM - this process's RSS",
# which goes negative once a few engines have run in one process (RSS is not given back).
KV_CACHE_BYTES = 256 << 20
ENGINE_KWARGS = dict(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2,
                     kv_cache_memory_bytes=KV_CACHE_BYTES, enable_prefix_caching=False,
                     disable_log_stats=False)


def start_engine(job: EngineJob, models: dict, settings: Settings):
    from vllm import LLM

    served = models["small"] if job.served == "small" else models["target"]
    kwargs = dict(ENGINE_KWARGS, max_model_len=512, max_num_seqs=max(settings.batch_sizes), seed=settings.seed)
    if job.spec is not None:
        kwargs["speculative_config"] = job.spec
    return LLM(model=served, **kwargs)


def cos_counters(llm) -> dict | None:
    try:
        from vllm_cos.offline import cos_stats

        stats = [s for s in cos_stats(llm) if s]
    except Exception:
        return None
    if not stats:
        return None
    keys = ("steps", "draft_forwards", "drafts_proposed", "drafts_accepted", "served_proposed",
            "served_accepted", "tokens_emitted", "row_steps", "fused_steps")
    return {k: sum(int(s.get(k, 0)) for s in stats) for k in keys}


def _diff(after: dict | None, before: dict | None) -> dict | None:
    if after is None:
        return None
    before = before or {}
    out = {}
    for k, v in after.items():
        if isinstance(v, list):
            b = before.get(k) or [0] * len(v)
            out[k] = [x - y for x, y in zip(v, b + [0] * (len(v) - len(b)))]
        else:
            out[k] = v - before.get(k, 0)
    return out


def generate_timed(llm, prompts: list[list[int]], batch: int, temperature: float,
                   max_tokens: int) -> tuple[int, float]:
    """Generated tokens and wall seconds: batch 1 = one request at a time over the prompts;
    batch B = B concurrent requests (prompts cycled) in one ``LLM.generate`` call."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def params(i):  # unseeded: seeded requests race (vllm_cos.coupling), a slightly lower acceptance
        return SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True,
                              top_k=0 if temperature > 0 else -1)

    tokens, start, cpu = 0, time.perf_counter(), time.process_time()
    if batch == 1:
        for i, p in enumerate(prompts):
            out = llm.generate([TokensPrompt(prompt_token_ids=p)], params(i), use_tqdm=False)
            tokens += len(out[0].outputs[0].token_ids)
    else:
        reqs = [TokensPrompt(prompt_token_ids=prompts[i % len(prompts)]) for i in range(batch)]
        outs = llm.generate(reqs, [params(i) for i in range(batch)], use_tqdm=False)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens, time.perf_counter() - start, time.process_time() - cpu


@dataclass
class Engine:
    """A started engine of a group, with its own spec-decode counters."""

    job: EngineJob
    llm: object
    spec: SpecCounts


class SpecCounts:
    """One engine's spec-decode counters, fed by its stat-logger manager.  vLLM's Prometheus
    counters are process-global: a second engine in the process re-registers them, after which
    ``LLM.get_metrics()`` of the first reads the second's, so side-by-side engines count here."""

    def __init__(self):
        self.totals = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0, "per_pos": []}

    @classmethod
    def attach(cls, llm) -> "SpecCounts":
        counts = cls()
        manager = getattr(getattr(llm, "llm_engine", None), "logger_manager", None)
        if manager is not None:
            manager.stat_loggers.append(counts)
        return counts

    def record(self, scheduler_stats, iteration_stats=None, mm_cache_stats=None, engine_idx=0):
        stats = getattr(scheduler_stats, "spec_decoding_stats", None)
        if stats is None:
            return
        for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            self.totals[key] += int(getattr(stats, key))
        per_pos, new = self.totals["per_pos"], list(stats.num_accepted_tokens_per_pos)
        per_pos += [0] * (len(new) - len(per_pos))
        for i, v in enumerate(new):
            per_pos[i] += int(v)

    def snapshot(self) -> dict:
        return dict(self.totals, per_pos=list(self.totals["per_pos"]))

    def log(self):  # the manager's other calls: nothing to do
        pass

    def log_engine_initialized(self):
        pass

    def record_sleep_state(self, *args):
        pass

    def record_admission_rejection(self, reason):
        pass


def measure_side_by_side(engines: list[Engine], temperature: float, batch: int, prompt_set: str,
                         prompts: list[list[int]], settings: Settings) -> list[Row]:
    """One measurement on every engine of a group: repetition i runs them in turn from engine
    i mod n, and each row keeps its best repetition, so no engine is timed in a quieter minute."""
    before = [(e.spec.snapshot(), cos_counters(e.llm)) for e in engines]
    runs: list[list[tuple]] = [[] for _ in engines]
    for i in range(settings.repeats):
        for k in range(len(engines)):
            e = (i + k) % len(engines)
            runs[e].append(generate_timed(engines[e].llm, prompts, batch, temperature, settings.max_tokens))
    return [_engine_row(e, temperature, batch, prompt_set, r, b, settings)
            for e, r, b in zip(engines, runs, before)]


def _engine_row(engine: Engine, temperature: float, batch: int, prompt_set: str, runs: list[tuple],
                before: tuple, settings: Settings) -> Row:
    job, llm = engine.job, engine.llm
    row = Row(method=job.method, rule=job.rule, param=job.param, temperature=temperature, batch=batch,
              prompts=prompt_set, gamma=job.gamma, proposer=None if job.method in ("single", "standard")
              else job.proposer, extra={"main_gamma": settings.gamma, "engine": job.label})
    spec = _diff(engine.spec.snapshot(), before[0])
    cos = _diff(cos_counters(llm), before[1])
    _set_timing(row, runs)
    row.load_avg = load_average()
    if job.method == "single" or job.method == "single_proposer" or job.method == "standard":
        row.mean_tokens_per_step = 1.0
    if spec and spec.get("num_drafts"):
        _read_acceptance(row, spec)
    if cos:
        row.extra["cos_counters"] = cos
        # tokens per request per engine step (row_steps: rows verified; older counters: steps)
        steps = cos.get("row_steps") or (cos.get("steps", 0) * (1 if batch == 1 else 0))
        if steps:
            row.mean_tokens_per_step = cos["tokens_emitted"] / steps
        if cos.get("row_steps"):  # drafts per request and step (gamma: auto: what the controller chose)
            row.extra["mean_drafts_per_step"] = cos["drafts_proposed"] / cos["row_steps"]
        if cos.get("served_proposed"):
            row.beta = cos["served_accepted"] / cos["served_proposed"]
    return row


def _read_acceptance(row: Row, spec: dict) -> None:
    """alpha, per-position acceptance and tokens per step from vLLM's spec-decode counters.  gamma:
    auto rows keep the first position only (alpha = a_1 / rounds): a round that drafted fewer than
    the maximum counts as a rejection at every later position, which would bias the rest low."""
    acc = acceptance_from_counters(spec["num_drafts"], spec["per_pos"])
    row.alpha, row.alpha_raw, row.per_position = acc["alpha_hat"], acc["alpha_raw"], acc["per_position"]
    if row.gamma == AUTO:
        row.per_position = row.per_position[:1]
        row.alpha, row.alpha_raw = (row.per_position or [None])[0], None
    row.mean_tokens_per_step = 1.0 + spec["num_accepted_tokens"] / spec["num_drafts"]
    row.extra["spec_counters"] = spec


def warm_up(llm, job: EngineJob, measurements: list[tuple], settings: Settings, prompt_ids: dict) -> None:
    """Not timed: first-call allocations; for gamma: auto also one full generation per batch size,
    so that the draft-length controller has measured its step costs before the timed runs."""
    prompts = prompt_ids[settings.prompt_sets[0]]
    generate_timed(llm, prompts[:1], 1, 1.0, 4)
    if job.gamma == AUTO:
        for t, b in dict.fromkeys((t, b) for t, b, _ in measurements):
            generate_timed(llm, prompts, b, t, settings.max_tokens)


def _refused_rows(job: EngineJob, exc: Exception, settings: Settings) -> list[Row]:
    """The rows of a job whose engine refused its configuration."""
    message = " ".join(str(exc).split())[:300] or type(exc).__name__
    unsupported = "supports" in message or "unsupported" in message.lower() or "CoSStartupError" in repr(exc)
    status = ("unsupported: " if unsupported else "error: ") + message
    return [Row(method=job.method, rule=job.rule, param=job.param, temperature=t, batch=b, prompts=s,
                gamma=job.gamma, status=status, load_avg=load_average(),
                extra={"engine": job.label, "main_gamma": settings.gamma})
            for t, b, s in job_measurements(job, settings)]


def run_engine_group(group: list[EngineJob], models: dict, settings: Settings, prompt_ids: dict,
                     progress) -> list[Row]:
    """Start (and warm up) every engine of a group (:func:`~vllm_cos.bench.jobs.engine_groups`:
    the jobs make the same measurements), measure them side by side, shut them down; the rows
    come job by job in the group's order."""
    rows: dict[str, list[Row]] = {job.label: [] for job in group}
    engines: list[Engine] = []
    try:
        for job in group:
            progress.set_description(f"start {job.label}")
            try:
                llm = start_engine(job, models, settings)
            except Exception as exc:  # the engine refused the configuration
                rows[job.label] = _refused_rows(job, exc, settings)
                progress.update(len(rows[job.label]))
                continue
            engines.append(Engine(job, llm, SpecCounts.attach(llm)))
            warm_up(llm, job, job_measurements(job, settings), settings, prompt_ids)
        for t, b, s in job_measurements(group[0], settings) if engines else []:
            progress.set_description(f"{' | '.join(e.job.label for e in engines)} T={t:g} B={b} {s}")
            for engine, row in zip(engines, measure_side_by_side(engines, t, b, s, prompt_ids[s], settings)):
                rows[engine.job.label].append(row)
            progress.update(len(engines))
    finally:
        for engine in engines:
            shutdown_llm(engine.llm)
    return [row for job in group for row in rows[job.label]]
