"""A real OpenAI-compatible server: ``vllm serve TARGET --speculative-config cos.yaml``.

One server (alternate schedule, weighted ensemble) on loopback, started through our console
entry point (``python -m vllm_cos.cli`` = the ``vllm`` / ``vllm-cos`` command); completions and
chat completions with the ``openai`` client, streaming and not, concurrently; greedy texts
equal the offline reference; usage is counted; /metrics shows speculative decoding counters and
the CoS counters (``vllm_cos_*``), the log shows the "CoS metrics" line; a client aborting
mid-stream leaves the server healthy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from engine_helpers import free_port, stop_server, wait_for_server

pytestmark = pytest.mark.engine

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
PROMPTS = ["def main(", "import os\nimport sys\n", "class Foo:\n    def __init__(self", "for i in range(10):\n"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def models(tiny_models) -> dict[str, Path]:
    return tiny_models


@pytest.fixture(scope="module")
def server_and_log(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    cos_yaml = tmp / "cos.yaml"
    cos_yaml.write_text(
        f"models:\n  - {{name: large, path: {models['large']}, gamma: 1}}\n"
        f"  - {{name: small, path: {models['small']}, gamma: 3}}\n"
        "rule: {name: weighted_ensemble, weights: {large: 0.5, small: 0.5}}\nschedule: alternate\n")
    template = tmp / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    port = free_port()
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    log = open(tmp / "server.log", "w")
    env["VLLM_LOG_STATS_INTERVAL"] = "2"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_cos.cli", "serve", str(models["large"]), "--speculative-config", str(cos_yaml),
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
         "--max-model-len", "256", "--gpu-memory-utilization", "0.2", "--chat-template", str(template),
         "--served-model-name", "cos"], stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_for_server(proc, base, tmp / "server.log")
    yield base, tmp / "server.log"
    stop_server(proc)


@pytest.fixture(scope="module")
def server(server_and_log):
    return server_and_log[0]


@pytest.fixture(scope="module")
def server_log(server_and_log):
    return server_and_log[1]


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
    prompts = [tok.encode(p) for p in PROMPTS]  # the server adds the tokenizer's BOS, as here
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


def _metrics(server) -> dict[str, float]:
    """name{labels} -> value (label sets kept; the pid label of multiprocess gauges dropped)."""
    with urllib.request.urlopen(server + "/metrics", timeout=10) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        if "{" in key:
            name, labels = key[:-1].split("{", 1)
            labels = ",".join(sorted(lab for lab in labels.split(",") if lab and not lab.startswith("pid=")))
            key = f"{name}{{{labels}}}"
        values[key] = values.get(key, 0.0) + float(value)
    return values


def _sum(values: dict[str, float], name: str, **labels) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in values.items()
               if k.split("{")[0] == name and all(w in k for w in want))


def test_metrics_show_speculative_counters(server, client):
    _complete(client, PROMPTS[0], stream=False)
    values = _metrics(server)
    drafts = _sum(values, "vllm:spec_decode_num_draft_tokens_total")
    assert drafts > 0
    assert 0 < _sum(values, "vllm:spec_decode_num_accepted_tokens_total") <= drafts


def test_metrics_show_cos_counters(server, client):
    """vllm_cos_*: forwards per model, proposals / acceptances per proposer, acceptance rate and
    mean accepted length; they grow with a request and agree with each other."""
    before = _metrics(server)
    _complete(client, PROMPTS[1], stream=False)
    after = _metrics(server)

    def grew(name, **labels):
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    assert grew("vllm_cos_forwards_total", model="large") > 0
    assert grew("vllm_cos_forwards_total", model="small") >= 3 * grew("vllm_cos_forwards_total", model="large") - 3
    assert grew("vllm_cos_emitted_tokens_total") >= MAX_TOKENS
    proposed = _sum(after, "vllm_cos_proposed_tokens_total")
    accepted = _sum(after, "vllm_cos_accepted_tokens_total")
    assert _sum(after, "vllm_cos_proposed_tokens_total", proposer="small") > 0
    assert _sum(after, "vllm_cos_proposed_tokens_total", proposer="large") > 0
    assert 0 < accepted <= proposed
    rate = _sum(after, "vllm_cos_acceptance_rate")
    assert abs(rate - accepted / proposed) < 1e-6
    length = _sum(after, "vllm_cos_mean_accepted_length")
    rounds = _sum(after, "vllm_cos_verification_rounds_total")
    assert abs(length - _sum(after, "vllm_cos_emitted_tokens_total") / rounds) < 1e-6
    assert length > 1.0


def test_server_log_has_cos_metrics_line(server, client, server_log):
    deadline = time.time() + 30
    while time.time() < deadline:
        _complete(client, PROMPTS[2], stream=False)
        if "CoS metrics: acceptance rate" in server_log.read_text():
            return
        time.sleep(2)
    pytest.fail("no 'CoS metrics' line in the server log")


def test_abort_mid_stream(server, client, expected):
    """A client that goes away mid-stream aborts its request; the server keeps serving
    (greedy output of a later request unchanged, no request left running)."""
    generated_before = _sum(_metrics(server), "vllm:generation_tokens_total")
    stream = client.completions.create(model="cos", prompt=PROMPTS[3], max_tokens=240, temperature=0.0,
                                       stream=True, extra_body={"ignore_eos": True})
    received = 0
    for chunk in stream:
        received += 1
        if received >= 3:
            break
    stream.close()
    text, _ = _complete(client, PROMPTS[0], stream=False)
    assert text == expected[0]
    deadline = time.time() + 30
    while time.time() < deadline:
        if _sum(_metrics(server), "vllm:num_requests_running") == 0:
            break
        time.sleep(1)
    else:
        pytest.fail("a request is still running after the client went away")
    # the aborted request stopped early: far fewer than its 240 tokens were generated
    generated = _sum(_metrics(server), "vllm:generation_tokens_total") - generated_before
    assert MAX_TOKENS < generated < 240, generated
