"""Peer baselines: transformers' standard collaborative-decoding loop (``ref_standard``) and its
assisted generation with ``assistant_ensemble_weight`` (``hf_ensemble``)."""

from __future__ import annotations

import time

from vllm_cos.bench.environment import load_average
from vllm_cos.bench.jobs import cd_rule, cos_spec, we_rule
from vllm_cos.bench.rows import Row, _set_timing
from vllm_cos.bench.settings import DEFAULT_TEMPERATURES, Settings


def _reference_models(models: dict):
    from vllm_cos.reference import CausalLM

    return CausalLM.from_pretrained(models["target"], "float32"), CausalLM.from_pretrained(models["small"], "float32")


def run_reference_peer(models: dict, rule: str, param: str, rule_dict: dict, temperature: float,
                       prompt_set: str, prompts: list[list[int]], settings: Settings, loaded,
                       batch: int = 1) -> Row:
    """``ReferenceDecoder`` with schedule standard: batch 1 = requests one after the other;
    batch B = B requests (prompts cycled) advancing in lockstep in one ``generate`` call."""
    from vllm_cos.config import load_config
    from vllm_cos.reference import ReferenceDecoder, SamplingSpec

    cfg = load_config(cos_spec(models, rule_dict, "standard", 1))
    decoder = ReferenceDecoder(cfg, list(loaded))

    def once():
        tokens, start, cpu = 0, time.perf_counter(), time.process_time()
        if batch > 1:
            reqs = [prompts[i % len(prompts)] for i in range(batch)]
            specs = [SamplingSpec(max_tokens=settings.max_tokens, temperature=temperature, seed=settings.seed + i)
                     for i in range(batch)]
            outs = decoder.generate(reqs, specs)
            return sum(len(o.token_ids) for o in outs), time.perf_counter() - start, time.process_time() - cpu
        for i, p in enumerate(prompts):
            out = decoder.generate([p], SamplingSpec(max_tokens=settings.max_tokens, temperature=temperature,
                                                     seed=settings.seed + i))
            tokens += len(out[0].token_ids)
        return tokens, time.perf_counter() - start, time.process_time() - cpu

    row = Row(method="ref_standard", rule=rule, param=param, temperature=temperature, batch=batch,
              prompts=prompt_set, mean_tokens_per_step=1.0, extra={"main_gamma": settings.gamma})
    _set_timing(row, [once() for _ in range(settings.repeats if batch == 1 else 1)])
    row.load_avg = load_average()
    return row


def hf_ensemble_available() -> tuple[bool, str]:
    try:
        import transformers
        from transformers import GenerationConfig
    except ImportError as exc:
        return False, f"transformers not importable: {exc}"
    if not hasattr(GenerationConfig(), "assistant_ensemble_weight"):
        return False, f"transformers {transformers.__version__} has no assistant_ensemble_weight"
    return True, f"transformers {transformers.__version__}"


def run_hf_ensemble_peer(models: dict, lam: float, temperature: float, prompt_set: str,
                         prompts: list[list[int]], settings: Settings, loaded) -> Row:
    """transformers assisted generation with ``assistant_ensemble_weight = lam`` (weight of the
    served model): drafts from the small model verified against lam p + (1 - lam) q."""
    import torch

    large, small = loaded[0].model, loaded[1].model
    runs = [_hf_ensemble_once(large, small, lam, temperature, prompts, settings) for _ in range(settings.repeats)]
    row = Row(method="hf_ensemble", rule="we", param=f"lambda={lam:g}", temperature=temperature, batch=1,
              prompts=prompt_set, gamma=settings.gamma, proposer="small",
              extra={"main_gamma": settings.gamma, "note": "static ensemble verification; greedy bonus "
                     "token from the served model only (not the ensemble)"})
    _set_timing(row, runs)
    row.load_avg = load_average()
    return row


def _hf_ensemble_once(large, small, lam, temperature, prompts, settings) -> tuple[int, float, float]:
    import torch

    tokens, start, cpu = 0, time.perf_counter(), time.process_time()
    for i, p in enumerate(prompts):
        torch.manual_seed(settings.seed + i)
        ids = torch.tensor([p], dtype=torch.long)
        kwargs = dict(assistant_model=small, assistant_ensemble_weight=lam, max_new_tokens=settings.max_tokens,
                      min_new_tokens=settings.max_tokens, num_assistant_tokens=settings.gamma,
                      num_assistant_tokens_schedule="constant", pad_token_id=1,
                      attention_mask=torch.ones_like(ids))
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False)
        with torch.inference_mode():
            out = large.generate(ids, **kwargs)
        tokens += out.shape[1] - ids.shape[1]
    return tokens, time.perf_counter() - start, time.process_time() - cpu


def run_peers(models: dict, settings: Settings, prompt_ids: dict, progress, threads: int) -> list[Row]:
    import torch

    torch.set_num_threads(threads)
    loaded = _reference_models(models)
    rows = []
    rule_t = settings.rule_temperatures or {}
    temps = settings.temperatures or DEFAULT_TEMPERATURES
    configs = [("we", f"lambda={lam:g}", we_rule(models, lam), lam) for lam in settings.lambdas]
    configs += [("cd", f"mu={mu:g}", cd_rule(models, mu), None) for mu in settings.mus]
    ok, why = hf_ensemble_available()
    for rule, param, rule_dict, lam in configs:
        for t in rule_t.get(rule, temps):
            for s in settings.prompt_sets:
                progress.set_description(f"peer ref_standard {rule} {param} T={t:g} {s}")
                rows.append(run_reference_peer(models, rule, param, rule_dict, t, s, prompt_ids[s], settings, loaded))
                progress.update(1)
                for b in settings.peer_batches:
                    if b > 1 and b in settings.batch_sizes:
                        progress.set_description(f"peer ref_standard {rule} {param} T={t:g} B={b} {s}")
                        rows.append(run_reference_peer(models, rule, param, rule_dict, t, s, prompt_ids[s],
                                                       settings, loaded, batch=b))
                        progress.update(1)
                if lam is None:
                    continue
                progress.set_description(f"peer hf_ensemble {param} T={t:g} {s}")
                if ok:
                    try:
                        rows.append(run_hf_ensemble_peer(models, lam, t, s, prompt_ids[s], settings, loaded))
                    except Exception as exc:
                        rows.append(Row(method="hf_ensemble", rule="we", param=param, temperature=t, batch=1,
                                        prompts=s, status="error: " + " ".join(str(exc).split())[:200]))
                else:
                    rows.append(Row(method="hf_ensemble", rule="we", param=param, temperature=t, batch=1,
                                    prompts=s, status="unavailable: " + why))
                progress.update(1)
    return rows


def count_peer_measurements(settings: Settings) -> int:
    if not settings.peers:
        return 0
    rule_t = settings.rule_temperatures or {}
    temps = settings.temperatures or DEFAULT_TEMPERATURES
    ref = 1 + len([b for b in settings.peer_batches if b > 1 and b in settings.batch_sizes])
    n = (len(settings.lambdas) * len(rule_t.get("we", temps)) * (1 + ref)
         + len(settings.mus) * len(rule_t.get("cd", temps)) * ref)
    return n * len(settings.prompt_sets)
