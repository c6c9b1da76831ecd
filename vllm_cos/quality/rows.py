"""The benchmark's rows (one engine each) and how a row is scored through vLLM.

Rows: every model alone (plain ``LLM``), a weighted ensemble (WE) of the two experts over a
lambda grid (lambda = weight of expert-a, 1 - lambda on expert-b; ``standard`` schedule, and
one lambda also under ``alternate``), contrastive decoding (CD: the large model as expert, the
small one as amateur, a mu grid) and CoSD with the rule and the tree verifier (draft expert-a,
assistant expert-b, CoSD's own loop: ``naive`` with the assistant served).  Every row is scored
by one engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one engine alive at a time) from prompt
logprobs of r: ``prompt_logprobs=1, max_tokens=1`` per window.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from vllm_cos.quality.scoring import WindowScore, window_score

ROLES = ("expert_a", "expert_b", "expert", "amateur")
DEFAULT_ROLES = {"expert_a": "expert-a", "expert_b": "expert-b", "expert": "large", "amateur": "small"}


@dataclass(frozen=True)
class RowSpec:
    label: str
    kind: str  # single | we | cd | cosd
    served: str  # model directory vLLM serves
    spec: dict | None = None  # speculative_config (a cos.yaml dict); None: the model alone
    value: float | None = None  # lambda (we) or mu (cd)
    schedule: str | None = None
    nll: bool = True  # False for CoSD: its prompt logprobs are 0 at the choice, not an NLL
    members: tuple[str, ...] = field(default=())  # model names (single: the one model)


def model_paths(models_dir: str | Path, roles: dict) -> dict[str, str]:
    """{model name: directory} of every role's model; SystemExit naming a missing one."""
    out = {}
    for role in ROLES:
        name = roles[role]
        path = Path(models_dir) / name
        if not (path / "config.json").is_file():
            raise SystemExit(f"quality: no model {name!r} ({role}) in {models_dir}")
        out[name] = str(path.resolve())
    return out


def _entry(name: str, paths: dict, gamma: int = 1) -> dict:
    return {"name": name, "path": paths[name], "gamma": gamma}


def we_row(roles: dict, paths: dict, lam: float, schedule: str = "standard") -> RowSpec:
    a, b = roles["expert_a"], roles["expert_b"]
    spec = {"models": [_entry(a, paths), _entry(b, paths, 3 if schedule != "standard" else 1)],
            "rule": {"name": "weighted_ensemble", "weights": {a: lam, b: 1.0 - lam}}, "schedule": schedule}
    suffix = "" if schedule == "standard" else f", {schedule}"
    return RowSpec(f"WE λ={lam:g}{suffix}", "we", paths[a], spec, lam, schedule, members=(a, b))


def cd_row(roles: dict, paths: dict, mu: float) -> RowSpec:
    e, m = roles["expert"], roles["amateur"]
    spec = {"models": [_entry(e, paths), _entry(m, paths)],
            "rule": {"name": "contrastive", "expert": e, "amateur": m, "mu": mu}, "schedule": "standard"}
    return RowSpec(f"CD μ={mu:g} ({e} − μ·{m})", "cd", paths[e], spec, mu, "standard", members=(e, m))


def cosd_row(roles: dict, paths: dict, verifier: str, tree: str | None) -> RowSpec:
    """CoSD's own loop: the assistant served, the draft model the naive proposer (gamma 3)."""
    draft, assistant = roles["expert_a"], roles["expert_b"]
    rule = {"name": "cosd", "draft": draft, "assistant": assistant, "verifier": verifier}
    rule.update({"tree": str(Path(tree).resolve())} if verifier == "tree" else {"alpha": 0.5, "beta": 0.5})
    spec = {"models": [_entry(assistant, paths), _entry(draft, paths, 3)], "target": assistant, "rule": rule,
            "schedule": "naive", "proposer": draft}
    label = f"CoSD {verifier} (draft {draft}, assistant {assistant})"
    return RowSpec(label, "cosd", paths[assistant], spec, None, "naive", nll=False, members=(assistant, draft))


def plan_rows(roles: dict, paths: dict, lambdas: Sequence[float], alternate_lambda: float | None,
              mus: Sequence[float], tree: str | None) -> list[RowSpec]:
    singles = list(dict.fromkeys(roles[r] for r in ("expert_a", "expert_b", "expert", "amateur")))
    rows = [RowSpec(f"{name} alone", "single", paths[name], members=(name,)) for name in singles]
    rows += [we_row(roles, paths, lam) for lam in lambdas]
    if alternate_lambda is not None:
        rows.append(we_row(roles, paths, alternate_lambda, "alternate"))
    rows += [cd_row(roles, paths, mu) for mu in mus]
    rows.append(cosd_row(roles, paths, "rule", None))
    if tree:
        rows.append(cosd_row(roles, paths, "tree", tree))
    return rows


def start_engine(row: RowSpec, max_model_len: int, max_num_seqs: int, seed: int):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    from vllm_cos.bench.engine_rows import ENGINE_KWARGS

    kwargs = dict(ENGINE_KWARGS, max_model_len=max_model_len, max_num_seqs=max_num_seqs, seed=seed,
                  disable_log_stats=True)
    if row.spec is not None:
        kwargs["speculative_config"] = row.spec
    return LLM(model=row.served, **kwargs)


def score_on_engine(llm, windows: Sequence) -> list[WindowScore]:
    """Every window as one prompt (one ``generate`` call): prompt logprobs of r, top 1."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(w.token_ids)) for w in windows], params,
                        use_tqdm=False)
    return [window_score(o.prompt_logprobs, w.token_ids) for o, w in zip(outs, windows)]


def run_row(row: RowSpec, windows: Sequence, max_model_len: int, max_num_seqs: int = 32,
            seed: int = 0) -> tuple[list[WindowScore], dict]:
    """Start the row's engine, score every window, stop it; (scores, timings in seconds)."""
    from vllm_cos.offline import shutdown_llm

    t0 = time.perf_counter()
    llm = start_engine(row, max_model_len, max_num_seqs, seed)
    t1 = time.perf_counter()
    try:
        scores = score_on_engine(llm, windows)
    finally:
        shutdown_llm(llm)
    t2 = time.perf_counter()
    return scores, {"start_s": round(t1 - t0, 2), "score_s": round(t2 - t1, 2)}
