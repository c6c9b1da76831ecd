"""``gamma: auto`` under ``vllm-cos serve`` with vLLM's defaults (multiprocessing on): the
controller's verify-only steps run *fused* (the draft group inside the served model's forward,
vllm_cos.adapters.fusion) next to drafting steps, across the engine-core process boundary.
Concurrent greedy completions (streamed and not) equal standard CoS's greedy text; the workers'
counters (dev-mode ``/collective_rpc cos_stats``) show both fused and drafting steps, and
/metrics the chosen draft length per batch bucket."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vllm_cos.soak.server import MODEL_NAME, Server

pytestmark = pytest.mark.engine

PROMPTS = ["def main(", "import os\nimport sys\n", "class Foo:\n    def __init__(self", "for i in range(10):\n"]
MAX_TOKENS = 48
RULE = {"name": "weighted_ensemble", "weights": {"large": 0.5, "small": 0.5}}


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-auto")
    cos_yaml = tmp / "cos.yaml"  # no gamma given: gamma auto
    cos_yaml.write_text(f"models:\n  - {{name: large, path: {tiny_models['large']}}}\n"
                        f"  - {{name: small, path: {tiny_models['small']}}}\n"
                        "rule: {name: weighted_ensemble, weights: {large: 0.5, small: 0.5}}\nschedule: alternate\n")
    models = Path(tiny_models["large"]).parent
    srv = Server(Path(tiny_models["large"]), cos_yaml, tmp / "server.log", max_model_len=256, kv_blocks=64,
                 chat_template=models / "chat_template.jinja", max_n=8)
    srv.start(300)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def expected(tiny_models):
    from transformers import AutoTokenizer

    from vllm_cos import reference
    from vllm_cos.config import load_config

    tok = AutoTokenizer.from_pretrained(str(tiny_models["large"]))
    cfg = load_config({"models": [{"name": "large", "path": str(tiny_models["large"])},
                                  {"name": "small", "path": str(tiny_models["small"])}],
                       "rule": RULE, "schedule": "standard"})
    return [tok.decode(ids) for ids in reference.generate(cfg, [tok.encode(p) for p in PROMPTS], MAX_TOKENS)]


def _complete(client, prompt: str, stream: bool) -> str:
    kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                  extra_body={"ignore_eos": True})
    if not stream:
        return client.completions.create(**kwargs).choices[0].text
    return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)


def test_auto_serves_greedy_text_of_standard_with_fused_and_drafting_steps(server, expected):
    import openai

    client = openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0)
    jobs = [(i, stream) for _ in range(2) for i in range(len(PROMPTS)) for stream in (False, True)]
    with ThreadPoolExecutor(len(jobs)) as pool:  # 16 at once, then the 4 prompts alone
        texts = list(pool.map(lambda job: _complete(client, PROMPTS[job[0]], job[1]), jobs))
    texts += [_complete(client, p, False) for p in PROMPTS]
    jobs += [(i, False) for i in range(len(PROMPTS))]
    assert texts == [expected[i] for i, _ in jobs]
    stats = server.cos_stats()
    assert stats and all(s.get("stash_requests", -1) == 0 for s in stats), stats
    assert sum(s["fused_steps"] for s in stats) > 0 and sum(s["drafts_proposed"] for s in stats) > 0, stats
    assert any(name.startswith("vllm_cos_draft_length{") for name in server.metrics())


def test_per_request_settings_over_http(server, expected, tiny_models):
    """``vllm_xargs``: a valid ``cos_weights`` serves that row's r (greedy: its reference text);
    an invalid one is HTTP 400 naming the key, and the server answers the next request."""
    import httpx
    from transformers import AutoTokenizer

    from vllm_cos import reference
    from vllm_cos.config import load_config

    def post(xargs):
        body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "vllm_xargs": xargs}
        return httpx.post(server.base + "/v1/completions", json=body, timeout=120, trust_env=False)

    for xargs, key in [({"cos_weights": [0.6, 0.6]}, "cos_weights"), ({"cos_weights": [0.5]}, "cos_weights"),
                       ({"cos_mu": 0.3}, "cos_mu"), ({"cos_speculate": 3}, "cos_speculate"), ({"cos_x": 1}, "cos_x")]:
        r = post(xargs)
        assert r.status_code == 400 and key in r.text, (xargs, r.status_code, r.text[:300])
    tok = AutoTokenizer.from_pretrained(str(tiny_models["large"]))
    cfg = load_config({"models": [{"name": "large", "path": str(tiny_models["large"])},
                                  {"name": "small", "path": str(tiny_models["small"])}],
                       "rule": {"name": "weighted_ensemble", "weights": [0.9, 0.1]}, "schedule": "standard"})
    want = tok.decode(reference.generate(cfg, [tok.encode(PROMPTS[0])], MAX_TOKENS)[0])
    r = post({"cos_weights": [0.9, 0.1]})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    assert post(None).json()["choices"][0]["text"] == expected[0]
