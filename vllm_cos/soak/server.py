"""One ``vllm-cos serve`` on loopback for the soak: start, probe (/health, /metrics, the
workers' CoS state, resident memory of the process tree), stop.

The server runs under vLLM's defaults (multiprocessing on: ``VLLM_ENABLE_V1_MULTIPROCESSING``
is removed from its environment) with three additions: ``VLLM_SERVER_DEV_MODE=1`` so that
``POST /collective_rpc {"method": "cos_stats"}`` reaches the CoS worker extension (the draft
stash's live requests, ``stash_requests``), ``VLLM_MAX_N_SEQUENCES`` (stock default 16384: a
request with n = 10,000 is otherwise served), and ``VLLM_TARGET_DEVICE=cpu`` unless set.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"  # loopback only
MODEL_NAME = "soak"  # --served-model-name

RULES = {
    "we": "rule: {name: weighted_ensemble, weights: {large: 0.5, small: 0.5}}\n",
    "cd": "rule: {name: contrastive, expert: large, amateur: small, mu: 0.1}\n",
}


def write_cos_yaml(rule: str, models: Path, out_dir: Path) -> Path | None:
    """The alternate-schedule cos.yaml of ``rule`` (we | cd) for the tiny models; None for 'plain'."""
    if rule == "plain":
        return None
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r} (we, cd, plain)")
    path = out_dir / f"cos-{rule}.yaml"
    path.write_text(f"models:\n  - {{name: large, path: {models / 'large'}, gamma: 1}}\n"
                    f"  - {{name: small, path: {models / 'small'}, gamma: 4}}\n"
                    f"{RULES[rule]}schedule: alternate\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def console_command() -> list[str]:
    """``vllm-cos`` next to this interpreter (the venv's console script), else ``python -m vllm_cos.cli``."""
    script = Path(sys.executable).with_name("vllm-cos")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vllm_cos.cli"]


def server_env(max_n: int) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's default: the engine core in its own process
    env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    env["VLLM_SERVER_DEV_MODE"] = "1"
    env["VLLM_MAX_N_SEQUENCES"] = str(max_n)
    return env


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name: value summed over label sets} and {name{labels}: value}."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        name = key.split("{", 1)[0]
        values[name] = values.get(name, 0.0) + float(value)
        if "{" in key:
            labels = ",".join(sorted(lab for lab in key[len(name) + 1:-1].split(",")
                                     if lab and not lab.startswith(("pid=", "engine=", "model_name="))))
            values[f"{name}{{{labels}}}"] = values.get(f"{name}{{{labels}}}", 0.0) + float(value)
    return values


class Server:
    """``vllm-cos serve MODEL [--speculative-config cos.yaml]`` with a KV cache of ``kv_blocks``
    blocks of 32 tokens (small enough to force preemption)."""

    def __init__(self, model: Path, cos_yaml: Path | None, log_path: Path, *, max_model_len: int,
                 kv_blocks: int, chat_template: Path, max_n: int, extra_args: tuple[str, ...] = ()):
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.log_path = log_path
        self.cos = cos_yaml is not None
        spec = [] if cos_yaml is None else ["--speculative-config", str(cos_yaml)]
        self.args = [*console_command(), "serve", str(model), *spec, "--host", HOST, "--port", str(self.port),
                     "--served-model-name", MODEL_NAME, "--dtype", "float32", "--enforce-eager",
                     "--gpu-memory-utilization", "0.2", "--max-model-len", str(max_model_len),
                     "--block-size", "32", "--num-gpu-blocks-override", str(kv_blocks),
                     "--chat-template", str(chat_template), *extra_args]
        self.env = server_env(max_n)
        self.proc = None
        self.stash_seen: list[int] = []  # draft stash readings under load (runner.stash_peak)

    def start(self, timeout: float) -> None:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_tail()}")
            if self.health() == 200:
                return
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"server did not answer /health within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return Path(self.log_path).read_text(errors="replace")[-chars:]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _get(self, path: str, timeout: float = 10.0):
        import httpx

        return httpx.get(self.base + path, timeout=timeout, trust_env=False)

    def health(self) -> int:
        try:
            return self._get("/health", timeout=5).status_code
        except Exception:  # noqa: BLE001 - not up (yet), or gone
            return 0

    def metrics(self) -> dict[str, float]:
        """/metrics parsed; {} when the server does not answer."""
        try:
            return parse_metrics(self._get("/metrics").text)
        except Exception:  # noqa: BLE001 - gone: the checks report it
            return {}

    def cos_stats(self) -> list[dict] | None:
        """Every worker's ``cos_stats`` (dev-mode /collective_rpc); None without CoS."""
        if not self.cos:
            return None
        import httpx

        try:
            r = httpx.post(self.base + "/collective_rpc", json={"method": "cos_stats"}, timeout=30, trust_env=False)
            r.raise_for_status()
            return json.loads(r.text)["results"]
        except Exception:  # noqa: BLE001 - no answer: reported as an unknown stash
            return [{"stash_requests": -1}]

    def rss_bytes(self) -> int:
        """Resident memory of the server's process tree (API server, engine core, workers)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
        except psutil.Error:
            return 0
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def wait_idle(self, timeout: float = 120.0) -> dict[str, float]:
        """Until no request runs or waits and the KV cache is empty (or ``timeout``); the last metrics."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if not m and not self.alive():
                return m
            busy = m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0)
            if (busy == 0 and m.get("vllm:kv_cache_usage_perc", 0) == 0) or time.monotonic() > deadline:
                return m
            time.sleep(1)

    def stop(self) -> None:
        """SIGTERM (vLLM shuts its engine down), SIGKILL after 60 s; then any child left over."""
        import psutil

        if self.proc is None:
            return
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        for child in children:
            try:
                child.wait(timeout=10)
            except psutil.TimeoutExpired:
                child.kill()
            except psutil.Error:
                pass
        self._log.close()
        self.proc = None
