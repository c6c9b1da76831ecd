"""Peer baselines: the plain-PyTorch decoders (``REF_PEERS``: the standard collaborative-decoding
loop ``ref_standard``, CoS with the bench's alternate schedule ``ref alternate`` and mixture sampling
``mixture (reference)``, :mod:`vllm_cos.mixture`; the last two for WE lambda=0.5 at T=1) and
transformers' assisted generation with ``assistant_ensemble_weight`` (``hf_ensemble``)."""

from __future__ import annotations

import time

from vllm_cos.bench.environment import load_average
from vllm_cos.bench.jobs import cd_rule, cos_spec, we_rule
from vllm_cos.bench.rows import MIXTURE, REF_PEERS, Row, _set_timing
from vllm_cos.bench.settings import DEFAULT_TEMPERATURES, Settings

# mixture (reference) and ref alternate run next to ref_standard for this WE configuration
MIXTURE_LAMBDA, MIXTURE_TEMPERATURE = 0.5, 1.0


def _reference_models(models: dict):
    from vllm_cos.reference import CausalLM

    return CausalLM.from_pretrained(models["target"], "float32"), CausalLM.from_pretrained(models["small"], "float32")


def _peer_decoder(method: str, models: dict, rule_dict: dict, settings: Settings, loaded):
    """The plain-PyTorch decoder of a ``REF_PEERS`` method on the loaded models."""
    from vllm_cos.config import load_config
    from vllm_cos.mixture import MixtureDecoder
    from vllm_cos.reference import ReferenceDecoder

    if method == "ref alternate":  # the bench's alternate: the served model gamma 1, the small one gamma
        return ReferenceDecoder(load_config(cos_spec(models, rule_dict, "alternate", settings.gamma)), list(loaded))
    cfg = load_config(cos_spec(models, rule_dict, "standard", 1))
    if method == MIXTURE:
        return MixtureDecoder(cfg, list(loaded))
    return ReferenceDecoder(cfg, list(loaded))


def run_reference_peer(models: dict, rule: str, param: str, rule_dict: dict, temperature: float,
                       prompt_set: str, prompts: list[list[int]], settings: Settings, loaded,
                       batch: int = 1, method: str = "ref_standard") -> Row:
    """A plain-PyTorch peer (``REF_PEERS``): ``ReferenceDecoder`` with schedule standard
    (``ref_standard``) or alternate (``ref alternate``), or ``MixtureDecoder`` (``mixture
    (reference)``).  Batch 1 = requests one after the other; batch B = B requests (prompts cycled)
    advancing in lockstep in one ``generate`` call."""
    from vllm_cos.reference import SamplingSpec

    decoder = _peer_decoder(method, models, rule_dict, settings, loaded)
    outputs: list = []

    def once():
        outputs.clear()
        start, cpu = time.perf_counter(), time.process_time()
        if batch > 1:
            reqs = [prompts[i % len(prompts)] for i in range(batch)]
            specs = [SamplingSpec(max_tokens=settings.max_tokens, temperature=temperature, seed=settings.seed + i)
                     for i in range(batch)]
            outputs.extend(decoder.generate(reqs, specs))
        else:
            for i, p in enumerate(prompts):
                outputs.extend(decoder.generate([p], SamplingSpec(max_tokens=settings.max_tokens,
                                                                  temperature=temperature, seed=settings.seed + i)))
        tokens = sum(len(o.token_ids) for o in outputs)
        return tokens, time.perf_counter() - start, time.process_time() - cpu

    alternate = method == "ref alternate"
    row = Row(method=method, rule=rule, param=param, temperature=temperature, batch=batch,
              prompts=prompt_set, gamma=settings.gamma if alternate else None,
              proposer="small" if alternate else None, mean_tokens_per_step=1.0,
              extra={"main_gamma": settings.gamma})
    _set_timing(row, [once() for _ in range(settings.repeats if batch == 1 else 1)])
    _describe_peer(row, outputs)
    row.load_avg = load_average()
    return row


def _describe_peer(row: Row, outputs: list) -> None:
    """Forwards per model and per token (last repetition); alternate: alpha, tokens per verification."""
    from vllm_cos.reference import DecodeStats

    if not outputs:
        return
    stats = DecodeStats(forwards=[0] * len(outputs[0].stats.forwards))
    for o in outputs:
        stats.merge(o.stats)
    if not stats.emitted:
        return
    row.extra["forwards"] = stats.forwards
    row.extra["forwards_per_token"] = [round(f / stats.emitted, 3) for f in stats.forwards]
    if row.method == "ref alternate":
        row.alpha = stats.accepted / stats.verified if stats.verified else None
        row.mean_tokens_per_step = stats.emitted / stats.verify_rounds if stats.verify_rounds else None
    if row.method == MIXTURE:
        row.extra["note"] = "model k ~ w, then the token from p_k (exact for WE at T=1); the others catch up"


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


def _reference_batches(settings: Settings) -> list[int]:
    """Batch 1 and the peer batch sizes the run also measures on the engines."""
    return [1] + [b for b in settings.peer_batches if b > 1 and b in settings.batch_sizes]


def _methods_for(lam: float | None, t: float) -> tuple[str, ...]:
    return REF_PEERS if lam == MIXTURE_LAMBDA and t == MIXTURE_TEMPERATURE else ("ref_standard",)


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
                for method in _methods_for(lam, t):
                    for b in _reference_batches(settings):
                        progress.set_description(f"peer {method} {rule} {param} T={t:g} B={b} {s}")
                        rows.append(run_reference_peer(models, rule, param, rule_dict, t, s, prompt_ids[s],
                                                       settings, loaded, batch=b, method=method))
                        progress.update(1)
                if lam is None:
                    continue
                progress.set_description(f"peer hf_ensemble {param} T={t:g} {s}")
                rows.append(_hf_ensemble_row(ok, why, models, lam, param, t, s, prompt_ids[s], settings, loaded))
                progress.update(1)
    return rows


def _hf_ensemble_row(ok: bool, why: str, models: dict, lam: float, param: str, t: float, s: str,
                     prompts: list[list[int]], settings: Settings, loaded) -> Row:
    if not ok:
        return Row(method="hf_ensemble", rule="we", param=param, temperature=t, batch=1, prompts=s,
                   status="unavailable: " + why)
    try:
        return run_hf_ensemble_peer(models, lam, t, s, prompts, settings, loaded)
    except Exception as exc:
        return Row(method="hf_ensemble", rule="we", param=param, temperature=t, batch=1, prompts=s,
                   status="error: " + " ".join(str(exc).split())[:200])


def count_peer_measurements(settings: Settings) -> int:
    if not settings.peers:
        return 0
    rule_t = settings.rule_temperatures or {}
    temps = settings.temperatures or DEFAULT_TEMPERATURES
    ref = len(_reference_batches(settings))
    n = sum(len(_methods_for(lam, t)) * ref + 1 for lam in settings.lambdas for t in rule_t.get("we", temps))
    n += len(settings.mus) * len(rule_t.get("cd", temps)) * ref
    return n * len(settings.prompt_sets)
