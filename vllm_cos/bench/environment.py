"""The performance environment the bench re-execs itself under, and the load average."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

REEXEC_FLAG = "VLLM_COS_BENCH_ENV"


def _find_iomp() -> str | None:
    for base in (Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"):
        candidate = base / "libiomp5.so"
        if candidate.is_file():
            return str(candidate)
    return None


def _find_tcmalloc() -> str | None:
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        for name in ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so"):
            candidate = Path(d) / name
            if candidate.exists():
                return str(candidate)
    return None


def performance_env(threads: int | None = None, base: dict | None = None) -> tuple[dict, list[str]]:
    """The environment the bench runs under, and warnings for what could not be set."""
    env = dict(os.environ if base is None else base)
    warnings = []
    preload = [x for x in env.get("LD_PRELOAD", "").split(":") if x]
    tcmalloc, iomp = _find_tcmalloc(), _find_iomp()
    if tcmalloc is None:
        warnings.append("tcmalloc not found (apt-get install -y libtcmalloc-minimal4); running without it")
    elif tcmalloc not in preload:
        preload.insert(0, tcmalloc)
    if iomp is None:
        warnings.append("libiomp5.so not found in the venv (pip install intel-openmp); running with GNU OpenMP")
    elif iomp not in preload:
        preload.append(iomp)
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    n = threads or default_threads()
    env["OMP_NUM_THREADS"] = str(n)
    env.setdefault("KMP_BLOCKTIME", "1")
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env[REEXEC_FLAG] = "1"
    return env, warnings


def default_threads() -> int:
    """1 thread on small machines: the tiny models gain nothing from intra-op parallelism and OpenMP
    spin-waits collide with other processes (measured on the 2-core dev box at load ~7: one
    thread 144-149 tok/s, two threads 79-103 tok/s for the served model alone); half the cores
    on larger machines.  Override with --threads."""
    cores = os.cpu_count() or 1
    return 1 if cores <= 4 else cores // 2


def maybe_reexec(argv: Sequence[str], threads: int | None) -> list[str]:
    """Re-exec this process with the performance environment (once); returns warnings."""
    if os.environ.get(REEXEC_FLAG) == "1":
        return [w for w in os.environ.get("VLLM_COS_BENCH_WARNINGS", "").split("|") if w]
    env, warnings = performance_env(threads)
    env["VLLM_COS_BENCH_WARNINGS"] = "|".join(warnings)
    for w in warnings:
        print(f"bench: warning: {w}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "vllm_cos.bench", *argv], env)
    return warnings  # not reached


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
