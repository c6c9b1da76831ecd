"""The plan: which engines to start (:class:`EngineJob`) and what to measure on each; the models and
the CoS speculative configs."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from vllm_cos.bench.settings import DEFAULT_TEMPERATURES, Settings
from vllm_cos.bench.theory import SERVED_GAMMA

AUTO = "auto"  # cos.yaml ``gamma: auto``: the served model 1, the others up to 4, draft_length auto
# the configurations that get a gamma: auto row next to each fixed-gamma naive / alternate row
MAIN_CONFIGS = {("we", "lambda=0.5"), ("cd", "mu=0.1"), ("we", "3 models equal")}
COSD_PRESETS = ("quick",)  # presets with the CoSD rows (vllm_cos.cosd; rule verifier, T=0)
COSD_PARAM = "rule alpha=0.5 beta=0.5"


@dataclass
class EngineJob:
    """One engine start and the measurements made on it."""

    label: str
    method: str
    rule: str  # none | we | cd | cosd
    param: str
    gamma: int | str | None  # AUTO: gamma: auto
    temperatures: list[float]
    spec: dict | None = None  # speculative_config (CoS dict or stock draft_model dict)
    served: str = "target"  # target | small
    batch_sizes: list[int] | None = None  # None: all
    prompt_sets: list[str] | None = None  # None: all
    proposer: str = "small"  # who drafts (naive) / drafts after the served model's bonus (alternate)


def _models(settings: Settings) -> dict[str, str]:
    base = Path(settings.models_dir) if settings.models_dir else None
    if base is None:
        from vllm_cos.tiny_models import build_tiny_models

        paths = build_tiny_models(_repo_root() / "models" / "tiny")
        base = Path(next(iter(paths.values()))).parent
    found = {p.name: str(p.resolve()) for p in sorted(base.iterdir()) if (p / "config.json").is_file()}
    for name in (settings.target, settings.small):
        if name not in found:
            raise SystemExit(f"bench: no model {name!r} in {base} (found: {', '.join(found) or 'none'})")
    models = {"target": found[settings.target], "small": found[settings.small]}
    third = settings.third or next((n for n in found if n not in (settings.target, settings.small)), None)
    if third is not None:
        if third not in found:
            raise SystemExit(f"bench: no model {third!r} in {base}")
        models["third"] = found[third]
    models["_names"] = {"target": settings.target, "small": settings.small, "third": third}
    return models


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def cos_spec(models: dict, rule: dict, schedule: str, gamma: int | str, three: bool = False) -> dict:
    """A CoS speculative config: the served model gamma 1, the others ``gamma``; ``gamma`` AUTO:
    the top-level ``gamma: auto`` instead of per-model gammas."""
    names = models["_names"]
    keys = ["target", "small", "third"] if three else ["target", "small"]
    entries = [{"name": names[k], "path": models[k]} for k in keys]
    if gamma != AUTO:
        for key, entry in zip(keys, entries):
            entry["gamma"] = SERVED_GAMMA if key == "target" else gamma
    spec = {"models": entries, "rule": rule, "schedule": schedule}
    if gamma == AUTO:
        spec["gamma"] = AUTO
    if schedule != "standard":
        spec["proposer"] = names["small"]
    return spec


def swapped_spec(models: dict, rule: dict, schedule: str, gamma: int) -> dict:
    """The small model served (verifier, bonus under alternate), the target model drafting."""
    names = models["_names"]
    return {"models": [{"name": names["small"], "path": models["small"], "gamma": 1},
                       {"name": names["target"], "path": models["target"], "gamma": gamma}],
            "rule": rule, "schedule": schedule, "proposer": names["target"]}


def we_rule(models: dict, lam: float) -> dict:
    names = models["_names"]
    return {"name": "weighted_ensemble", "weights": {names["target"]: lam, names["small"]: 1.0 - lam}}


def we3_rule(models: dict) -> dict:
    """WE with the served, the small and the third model equally weighted."""
    names = models["_names"]
    return {"name": "weighted_ensemble", "weights": {names[k]: 1 / 3 for k in ("target", "small", "third")}}


def cd_rule(models: dict, mu: float) -> dict:
    names = models["_names"]
    return {"name": "contrastive", "expert": names["target"], "amateur": names["small"], "mu": mu}


def cosd_rule(models: dict) -> dict:
    """CoSD, rule verifier (alpha = beta = 0.5): the small model drafts, the served model assists."""
    names = models["_names"]
    return {"name": "cosd", "draft": names["small"], "assistant": names["target"], "verifier": "rule"}


def _cosd_jobs(settings: Settings, models: dict) -> list[EngineJob]:
    """quick: CoSD (greedy) under naive next to standard with the same rule (its "×std"), batch
    1 and 8, first prompt set."""
    if settings.preset not in COSD_PRESETS:
        return []
    batches = [b for b in settings.batch_sizes if b <= 8] or None
    return [EngineJob(f"{schedule} cosd rule", schedule, "cosd", COSD_PARAM,
                      None if schedule == "standard" else settings.gamma, [0.0],
                      spec=cos_spec(models, cosd_rule(models), schedule, settings.gamma),
                      batch_sizes=batches, prompt_sets=settings.prompt_sets[:1])
            for schedule in ("standard", "naive") if schedule in settings.schedules]


def plan(settings: Settings, models: dict) -> list[EngineJob]:
    temps = settings.temperatures or DEFAULT_TEMPERATURES
    rule_t = settings.rule_temperatures or {}
    configs = [("we", f"lambda={lam:g}", we_rule(models, lam)) for lam in settings.lambdas]
    configs += [("cd", f"mu={mu:g}", cd_rule(models, mu)) for mu in settings.mus]
    jobs = _baseline_jobs(settings, models, temps)
    jobs += _rule_jobs(settings, models, configs, temps, rule_t)
    if settings.swap_proposer:
        jobs += _swapped_jobs(settings, models, configs, temps, rule_t)
    jobs += _gamma_grid_jobs(settings, models, temps, rule_t)
    jobs += _cosd_jobs(settings, models)
    if settings.three_models and "third" in models:
        jobs += _three_model_jobs(settings, models, temps, rule_t)
    return jobs


def _baseline_jobs(settings: Settings, models: dict, temps: list[float]) -> list[EngineJob]:
    """Each model served alone (t_p, t_q) and plain speculative decoding."""
    jobs: list[EngineJob] = []
    if settings.single:
        jobs.append(EngineJob("single (served model)", "single", "none", "", None, temps))
        jobs.append(EngineJob("single (proposer alone)", "single_proposer", "none", "", None, temps,
                              served="small"))
    if settings.sd:
        jobs.append(EngineJob(f"sd draft_model γ={settings.gamma}", "sd", "none", "", settings.gamma, temps,
                              spec={"method": "draft_model", "model": models["small"],
                                    "num_speculative_tokens": settings.gamma},
                              batch_sizes=[b for b in settings.batch_sizes if b in settings.sd_batches] or None))
    return jobs


def _rule_jobs(settings: Settings, models: dict, configs: list, temps: list[float], rule_t: dict) -> list[EngineJob]:
    """Every schedule on every rule configuration, all batch sizes and prompt sets."""
    jobs: list[EngineJob] = []
    for rule, param, rule_dict in configs:
        t = rule_t.get(rule, temps)
        fixed = []
        for schedule in settings.schedules:
            gamma = None if schedule == "standard" else settings.gamma
            fixed.append(EngineJob(f"{schedule} {rule} {param}", schedule, rule, param, gamma, t,
                                   spec=cos_spec(models, rule_dict, schedule, settings.gamma)))
        jobs += _with_auto(fixed, settings, models, rule_dict)
    return jobs


def _with_auto(jobs: list[EngineJob], settings: Settings, models: dict, rule_dict: dict,
               three: bool = False) -> list[EngineJob]:
    """A gamma: auto job right after the last fixed-gamma naive / alternate job of a main
    configuration (same temperatures, batch sizes and prompt sets)."""
    if not settings.auto_gamma:
        return jobs
    out: list[EngineJob] = []
    for i, job in enumerate(jobs):
        out.append(job)
        last_of_schedule = i + 1 == len(jobs) or jobs[i + 1].method != job.method
        if job.method in ("naive", "alternate") and (job.rule, job.param) in MAIN_CONFIGS and last_of_schedule:
            out.append(replace(job, label=job.label.split(" γ=")[0] + " γ=auto", gamma=AUTO,
                               spec=cos_spec(models, rule_dict, job.method, AUTO, three)))
    return out


def _swapped_jobs(settings: Settings, models: dict, configs: list, temps: list[float],
                  rule_t: dict) -> list[EngineJob]:
    """WE naive / alternate with the roles swapped (the small model served, the target drafting)."""
    jobs: list[EngineJob] = []
    proposer = models["_names"]["target"]
    for rule, param, rule_dict in configs:
        for schedule in [s for s in ("naive", "alternate") if s in settings.schedules and rule == "we"]:
            jobs.append(EngineJob(f"{schedule} {rule} {param} proposer {proposer}", schedule, rule, param,
                                  settings.gamma, rule_t.get(rule, temps)[:1],
                                  spec=swapped_spec(models, rule_dict, schedule, settings.gamma),
                                  served="small", batch_sizes=[1], prompt_sets=settings.prompt_sets[:1],
                                  proposer=proposer))
    return jobs


def _gamma_grid_jobs(settings: Settings, models: dict, temps: list[float], rule_t: dict) -> list[EngineJob]:
    """The gamma grid (batch 1, first prompt set): WE lambda=0.5 and CD with the first mu."""
    jobs: list[EngineJob] = []
    if not settings.gammas:
        return jobs
    grid_configs = [("we", "lambda=0.5", we_rule(models, 0.5), 0.5 in settings.lambdas)]
    if settings.mus:
        mu = settings.mus[0]
        grid_configs.append(("cd", f"mu={mu:g}", cd_rule(models, mu), True))
    for rule, param, rule_dict, has_standard in grid_configs:
        t = rule_t.get(rule, temps)[:1]
        for g in settings.gammas:
            if g == settings.gamma and has_standard:
                continue
            for schedule in [s for s in settings.gamma_schedules if s in settings.schedules]:
                jobs.append(EngineJob(f"{schedule} {rule} {param} γ={g}", schedule, rule, param, g, t,
                                      spec=cos_spec(models, rule_dict, schedule, g),
                                      batch_sizes=[1], prompt_sets=settings.prompt_sets[:1]))
        if not has_standard and "standard" in settings.schedules:
            jobs.append(EngineJob(f"standard {rule} {param}", "standard", rule, param, None, t,
                                  spec=cos_spec(models, rule_dict, "standard", 1),
                                  batch_sizes=[1], prompt_sets=settings.prompt_sets[:1]))
    return jobs


def _three_model_jobs(settings: Settings, models: dict, temps: list[float], rule_t: dict) -> list[EngineJob]:
    """WE with three equally weighted models (every batch size, first prompt set)."""
    rule_dict = we3_rule(models)
    # gamma 1: the paper's 3-model setting (every model proposes one token per turn)
    variants = [("standard", None), ("naive", settings.gamma), ("alternate", 1), ("alternate", settings.gamma)]
    jobs = [EngineJob(f"{schedule} we 3 models" + (f" γ={gamma}" if gamma else ""), schedule, "we",
                      "3 models equal", gamma, rule_t.get("we", temps)[:1],
                      spec=cos_spec(models, rule_dict, schedule, gamma or 1, three=True),
                      prompt_sets=settings.prompt_sets[:1])
            for schedule, gamma in dict.fromkeys(variants) if schedule in settings.schedules]
    return _with_auto(jobs, settings, models, rule_dict, three=True)


def engine_groups(jobs: list[EngineJob], limit: int) -> list[list[EngineJob]]:
    """Consecutive jobs of one rule configuration that make the same measurements, at most
    ``limit`` per group: their engines run side by side and take turns on every repetition, so
    that a change of the machine's load during the run hits standard and CoS alike instead of
    whichever was measured in that minute.  Baselines (rule ``none``) stay one engine each."""
    groups: list[list[EngineJob]] = []
    for job in jobs:
        last = groups[-1] if groups else None
        if (last is not None and len(last) < limit and job.rule != "none"
                and _measurement_key(last[0]) == _measurement_key(job)):
            last.append(job)
        else:
            groups.append([job])
    return groups


def _measurement_key(job: EngineJob) -> tuple:
    return (job.rule, job.param, tuple(job.temperatures), job.served,
            tuple(job.batch_sizes or ()), tuple(job.prompt_sets or ()))


def job_measurements(job: EngineJob, settings: Settings) -> list[tuple[float, int, str]]:
    batches = job.batch_sizes or settings.batch_sizes
    sets = job.prompt_sets or settings.prompt_sets
    return [(t, b, s) for t in job.temperatures for b in batches for s in sets]
