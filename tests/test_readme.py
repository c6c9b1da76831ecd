"""README.md's marked code blocks run as written (extracted from the file, not copied).

A block marked ``<!-- readme-test: NAME -->`` right before its fence is run here: ``check``
(``vllm-cos check``) and ``reference`` (the PyTorch decoder) in the fast tier; in the engine
tier, ``offline`` as a script in a subprocess under vLLM's defaults (multiprocessing on, no
``VLLM_ENABLE_V1_MULTIPROCESSING`` or insecure serialization), and ``serve`` started once and
queried with ``query`` (completions and chat), then stopped.  The configuration block must
load as a file in ``configs/``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine_helpers import free_port, stop_server, wait_for_server

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\s*```(\w+)\n(.*?)```", re.DOTALL)
# What the Makefile/tests set and a newcomer's shell does not.
NOT_DEFAULT = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_ALLOW_INSECURE_SERIALIZATION", "VLLM_TARGET_DEVICE")


def readme_blocks() -> dict[str, str]:
    blocks = {name: code for name, _, code in BLOCK.findall((REPO / "README.md").read_text())}
    assert {"check", "serve", "query", "offline", "reference"} <= set(blocks), sorted(blocks)
    return blocks


def _shell(code: str) -> str:
    """A bash block as written; ``.venv/bin/`` points at this interpreter's venv if the repo has none."""
    if not (REPO / ".venv" / "bin").is_dir():
        code = code.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
    return code


def _default_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in NOT_DEFAULT}


@pytest.fixture(scope="module")
def repo_models(tiny_models):
    """The README's paths (``models/tiny``) exist."""
    if not (REPO / "models" / "tiny" / "large").is_dir():
        pytest.skip("the README's models/tiny is not built here (VLLM_COS_MODELS_DIR points elsewhere)")
    return tiny_models


def test_quick_start_is_two_commands():
    text = (REPO / "README.md").read_text()
    quick = text[text.index("## Quick start"):text.index("## Configuration")]
    fences = re.findall(r"```bash\n(.*?)```", quick, re.DOTALL)
    commands = [line.split("#")[0].strip() for f in fences for line in f.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_configuration_block_loads_as_a_configs_file(tiny_models, tmp_path):
    from conftest import tiny_models_dir
    from vllm_cos.config import load_config

    block = re.search(r"## Configuration.*?```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    (tmp_path / "configs").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_models_dir())
    (tmp_path / "configs" / "cos.yaml").write_text(block.group(1))
    cfg = load_config(tmp_path / "configs" / "cos.yaml")
    assert cfg.model_names == ("large", "small") and cfg.target == "large"


def test_every_config_field_is_in_the_table():
    import dataclasses

    from vllm_cos.config import CoSConfig, ModelSpec

    text = (REPO / "README.md").read_text()
    fields = [f.name for f in dataclasses.fields(CoSConfig)] + ["gamma"]
    fields += [f"models[i].{f.name}" for f in dataclasses.fields(ModelSpec)]
    fields += ["rule.name", "rule.weights", "rule.function", "rule.inputs", "rule.params"]
    for field in fields:
        assert f"| `{field}` |" in text, field


def test_check_block(repo_models):
    proc = subprocess.run(["bash", "-ec", _shell(readme_blocks()["check"])], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=_default_env())
    assert proc.returncode == 0, proc.stderr
    assert "served: large" in proc.stdout and "then small x4 draft" in proc.stdout


def test_reference_block(repo_models):
    proc = subprocess.run([sys.executable, "-c", readme_blocks()["reference"]], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=_default_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "token_ids" in proc.stdout or "[" in proc.stdout


@pytest.mark.engine
def test_offline_script_under_vllm_defaults(repo_models, tmp_path):
    script = tmp_path / "offline.py"
    script.write_text(readme_blocks()["offline"])
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=_default_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    stats = [line for line in proc.stdout.splitlines() if line.startswith("[{")]
    assert stats and "'drafts_proposed'" in stats[-1], proc.stdout[-2000:]


def _serve_command(block: str, port: int) -> str:
    """The README's serve command; the port (and host) are added last (the last flag wins)."""
    return _shell(block).rstrip() + f" --port {port} --host 127.0.0.1"


@pytest.mark.engine
def test_serve_and_query_blocks(repo_models, tmp_path):
    blocks = readme_blocks()
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", "-ec", "exec " + _serve_command(blocks["serve"], port)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, env=_default_env())
    try:
        wait_for_server(proc, f"http://127.0.0.1:{port}", log_path)
        query = blocks["query"].replace("localhost:8000", f"127.0.0.1:{port}")
        replies = []
        for command in re.split(r"\n(?=curl )", query.strip()):
            out = subprocess.run(["bash", "-ec", command + " --fail-with-body"], capture_output=True,
                                 text=True, timeout=120)
            assert out.returncode == 0, out.stdout + out.stderr
            replies.append(json.loads(out.stdout))
    finally:
        stop_server(proc)
    completion, chat = replies
    assert completion["choices"][0]["text"] and completion["usage"]["completion_tokens"] == 16
    assert chat["choices"][0]["message"]["content"] and chat["usage"]["completion_tokens"] == 16
