"""A real OpenAI-compatible server: ``vllm serve TARGET --speculative-config cos.yaml``.

One server (alternate schedule, weighted ensemble) on loopback, started through our console
entry point (``python -m vllm_cos.cli`` = the ``vllm`` / ``vllm-cos`` command); completions and
chat completions with the ``openai`` client, streaming and not, concurrently; greedy texts
equal the offline reference; usage is counted; /metrics shows speculative decoding counters.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
PROMPTS = ["def main(", "import os\nimport sys\n", "class Foo:\n    def __init__(self", "for i in range(10):\n"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def models(request) -> dict[str, Path]:
    try:
        return request.getfixturevalue("tiny_models")
    except pytest.FixtureLookupError:
        shared = Path("/work/shared/models")
        if (shared / "large").is_dir():
            return {"large": shared / "large", "medium": shared / "expert-a", "small": shared / "small"}
        pytest.skip("no tiny models (tiny_models fixture missing)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    cos_yaml = tmp / "cos.yaml"
    cos_yaml.write_text(
        f"models:\n  - {{name: large, path: {models['large']}, gamma: 1}}\n"
        f"  - {{name: small, path: {models['small']}, gamma: 3}}\n"
        "rule: {name: weighted_ensemble, weights: {large: 0.5, small: 0.5}}\nschedule: alternate\n")
    template = tmp / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    port = _free_port()
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_cos.cli", "serve", str(models["large"]), "--speculative-config", str(cos_yaml),
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
         "--max-model-len", "256", "--gpu-memory-utilization", "0.2", "--chat-template", str(template),
         "--served-model-name", "cos"], stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 420
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + (tmp / "server.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(2)
    else:
        proc.terminate()
        raise RuntimeError("server did not start:\n" + (tmp / "server.log").read_text()[-3000:])
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key="none")


@pytest.fixture(scope="module")
def expected(models):
    from transformers import AutoTokenizer

    from vllm_cos import reference
    from vllm_cos.config import load_config

    tok = AutoTokenizer.from_pretrained(str(models["large"]))
    cfg = load_config({"models": [{"name": "large", "path": str(models["large"])},
                                  {"name": "small", "path": str(models["small"])}],
                       "rule": {"name": "weighted_ensemble", "weights": {"large": 0.5, "small": 0.5}},
                       "schedule": "standard"})
    prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    return [tok.decode(ids) for ids in reference.generate(cfg, prompts, MAX_TOKENS)]


def _complete(client, prompt: str, stream: bool) -> tuple[str, object]:
    kwargs = dict(model="cos", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                  extra_body={"ignore_eos": True})
    if not stream:
        out = client.completions.create(**kwargs)
        return out.choices[0].text, out.usage
    text = "".join(chunk.choices[0].text for chunk in client.completions.create(stream=True, **kwargs)
                   if chunk.choices)
    return text, None


def test_completions_concurrent_streaming_and_not(client, expected):
    jobs = [(p, s) for p in PROMPTS for s in (False, True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: _complete(client, *job), jobs))
    for (prompt, stream), (text, usage) in zip(jobs, results):
        assert text == expected[PROMPTS.index(prompt)], (prompt, stream)
        if usage is not None:
            assert usage.completion_tokens == MAX_TOKENS and usage.prompt_tokens > 0


def test_chat_completions(client):
    def chat(stream):
        kwargs = dict(model="cos", messages=[{"role": "user", "content": "def main("}], max_tokens=MAX_TOKENS,
                      temperature=0.0, extra_body={"ignore_eos": True})
        if not stream:
            out = client.chat.completions.create(**kwargs)
            assert out.usage.completion_tokens == MAX_TOKENS
            return out.choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)

    with ThreadPoolExecutor(2) as pool:
        plain, streamed = pool.map(chat, [False, True])
    assert plain and plain == streamed


def test_metrics_show_speculative_counters(server, client):
    _complete(client, PROMPTS[0], stream=False)
    with urllib.request.urlopen(server + "/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(("vllm:spec_decode_num_draft_tokens_total", "vllm:spec_decode_num_accepted_tokens_total")):
            name = line.split("{")[0]
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    assert values.get("vllm:spec_decode_num_draft_tokens_total", 0) > 0
    assert 0 < values.get("vllm:spec_decode_num_accepted_tokens_total", 0) <= values["vllm:spec_decode_num_draft_tokens_total"]
