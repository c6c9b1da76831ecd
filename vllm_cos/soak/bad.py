"""Malformed and hostile requests, sent as raw HTTP between the good ones.

Each case builds a request body from a random source (so the N bad requests vary) and says
what a server must answer: ``4xx`` with a message that names the problem (one of ``keywords``,
case-insensitive), ``accepted`` (stock vLLM serves it by design: unknown top-level fields are
ignored, ``OpenAIBaseModel`` has ``extra="allow"``), or ``stock-5xx``: vLLM 0.32.0 itself
answers HTTP 500 (found by this soak and reproduced on a server without CoS; a 4xx naming the
field is accepted too, for a vLLM that has fixed it).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable

from vllm_cos.soak.workload import PROMPTS, VOCAB, Job

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@dataclass(frozen=True)
class BadCase:
    name: str
    path: str
    body: bytes
    keywords: tuple[str, ...]
    expect: str = "4xx"  # | "accepted" | "stock-5xx"
    content_type: str = "application/json"


def _base(api: str, rng: random.Random, model: str) -> dict:
    text = rng.choice(PROMPTS)
    if api == "chat":
        return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8}
    return {"model": model, "prompt": text, "max_tokens": 8}


def _neg_ids(r: random.Random) -> dict:
    return {"prompt": [r.randrange(VOCAB), -r.randint(1, 10**6)]}


def _oov_ids(r: random.Random) -> dict:
    return {"prompt": [r.randrange(VOCAB), r.choice([VOCAB, r.randint(VOCAB, 10**9)])]}


# (name, api, update of the base body given (rng, max_model_len), keywords[, expect])
Mutation = Callable[[random.Random, int], dict]
FIELD_CASES: list[tuple] = [
    ("max_tokens<0", "completions", lambda r, L: {"max_tokens": -r.randint(1, 10**6)}, ("max_tokens",)),
    ("max_tokens=0", "chat", lambda r, L: {"max_tokens": 0}, ("max_tokens",)),
    ("max_tokens huge", "completions", lambda r, L: {"max_tokens": r.choice([L + 1, 10**9, 2**70])}, ("max_tokens",)),
    ("max_tokens huge", "chat", lambda r, L: {"max_tokens": r.randint(L + 1, 10**12)}, ("max_tokens",)),
    ("n=10000", "completions", lambda r, L: {"n": 10000, "temperature": 1.0}, ("n must be at most",)),
    ("n=10000", "chat", lambda r, L: {"n": 10000, "temperature": 1.0}, ("n must be at most",)),
    ("n<1", "completions", lambda r, L: {"n": -r.randint(0, 5), "temperature": 1.0}, ("n must be",)),
    ("n>1 greedy", "completions", lambda r, L: {"n": 2, "temperature": 0}, ("n must be 1",)),
    ("prompt ids > max_model_len", "completions", lambda r, L: {"prompt": [5] * r.randint(L + 1, 2 * L)},
     ("maximum context length",)),
    ("prompt text > max_model_len", "completions", lambda r, L: {"prompt": "x = 1\n" * (2 * L)},
     ("maximum context length",)),
    ("prompt > max_model_len", "chat", lambda r, L: {"messages": [{"role": "user", "content": "y = 2\n" * (2 * L)}]},
     ("maximum context length",)),
    ("token id >= vocab", "completions", lambda r, L: _oov_ids(r), ("out of vocabulary",)),
    ("token id < 0", "completions", lambda r, L: _neg_ids(r), ("prompt",)),
    ("temperature<0", "completions", lambda r, L: {"temperature": -r.uniform(0.01, 100)}, ("temperature",)),
    ("temperature<0", "chat", lambda r, L: {"temperature": -1.0}, ("temperature",)),
    ("top_p=0", "completions", lambda r, L: {"top_p": 0.0, "temperature": 1.0}, ("top_p",)),
    ("top_p=0", "chat", lambda r, L: {"top_p": 0.0}, ("top_p",)),
    ("top_p>1", "completions", lambda r, L: {"top_p": r.uniform(1.01, 10)}, ("top_p",)),
    ("top_k<-1", "completions", lambda r, L: {"top_k": -r.randint(2, 100)}, ("top_k",)),
    ("min_tokens>max_tokens", "completions", lambda r, L: {"min_tokens": 20, "max_tokens": 5}, ("min_tokens",)),
    ("frequency_penalty", "completions", lambda r, L: {"frequency_penalty": r.uniform(2.5, 100)},
     ("frequency_penalty",)),
    ("repetition_penalty=0", "completions", lambda r, L: {"repetition_penalty": 0}, ("repetition_penalty",)),
    ("logprobs > max", "completions", lambda r, L: {"logprobs": r.randint(21, 10**6)}, ("logprobs",)),
    ("top_logprobs > max", "chat", lambda r, L: {"logprobs": True, "top_logprobs": r.randint(21, 1000)},
     ("logprobs",)),
    ("seed > int64", "completions", lambda r, L: {"seed": 2**64 + r.randint(0, 9)}, ("seed",)),
    ("stop: 5 strings", "completions", lambda r, L: {"stop": list("abcde")}, ("stop",)),
    ("logit_bias key", "completions", lambda r, L: {"logit_bias": {"abc": 1.0}}, ("logit_bias",)),
    ("logit_bias id", "completions", lambda r, L: {"logit_bias": {str(r.randint(VOCAB, 10**6)): 1.0}},
     ("logit_bias",)),
    ("allowed_token_ids=[]", "completions", lambda r, L: {"allowed_token_ids": []}, ("allowed_token_ids",)),
    ("stop_token_ids id", "completions", lambda r, L: {"stop_token_ids": [r.randint(VOCAB, 10**6)]},
     ("stop_token_ids",)),
    ("prompt empty", "completions", lambda r, L: {"prompt": ""}, ("prompt",)),
    ("messages empty", "chat", lambda r, L: {"messages": []}, ("conversation",)),
    ("stream_options, no stream", "completions", lambda r, L: {"stream_options": {"include_usage": True}},
     ("stream",)),
    ("model unknown", "completions", lambda r, L: {"model": "no-such-model"}, ("model",)),
    ("chat_template in request", "chat", lambda r, L: {"chat_template": "{{ 1 }}"}, ("chat template",)),
    ("image for a text model", "chat", lambda r, L: {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]}, ("multimodal",)),
    # wrong types
    ("max_tokens: str", "completions", lambda r, L: {"max_tokens": "many"}, ("max_tokens",)),
    ("max_tokens: float", "completions", lambda r, L: {"max_tokens": 1.5}, ("max_tokens",)),
    ("temperature: str", "chat", lambda r, L: {"temperature": "hot"}, ("temperature",)),
    ("n: str", "completions", lambda r, L: {"n": "two"}, (".n", "'n'", "n:")),
    ("stream: str", "completions", lambda r, L: {"stream": "maybe"}, ("stream",)),
    ("prompt: dict", "completions", lambda r, L: {"prompt": {"text": "x"}}, ("prompt",)),
    ("messages: str", "chat", lambda r, L: {"messages": "hello"}, ("messages",)),
    ("stop: int", "completions", lambda r, L: {"stop": 123}, ("stop",)),
    ("logprobs: str", "completions", lambda r, L: {"logprobs": "five"}, ("logprobs",)),
    ("seed: str", "chat", lambda r, L: {"seed": "lucky"}, ("seed",)),
    # structured outputs
    ("schema: bad type", "completions", lambda r, L: {"structured_outputs": {"json": {"type": "nonsense"}}},
     ("nonsense",)),
    ("schema: unsatisfiable", "completions", lambda r, L: {"structured_outputs": {"json": {
        "type": "integer", "minimum": 10, "maximum": 2}}}, ("minimum",)),
    ("schema: bad $ref", "chat", lambda r, L: {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/defs/none"}}}}}}, ("/defs/none",)),
    ("schema: bad keyword value", "chat", lambda r, L: {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer", "minimum": "zero"}}}}}},
     ("minimum",)),
    ("json_schema missing", "chat", lambda r, L: {"response_format": {"type": "json_schema"}}, ("json_schema",)),
    ("response_format type", "chat", lambda r, L: {"response_format": {"type": "yaml"}}, ("response_format",)),
    ("regex invalid", "completions", lambda r, L: {"structured_outputs": {"regex": "([a-z"}}, ("regex",)),
    ("choice empty", "completions", lambda r, L: {"structured_outputs": {"choice": []}}, ("choice",)),
    ("grammar invalid", "completions", lambda r, L: {"structured_outputs": {"grammar": "root ::= ??? x"}},
     ("grammar",)),
    ("two constraints", "completions", lambda r, L: {"structured_outputs": {"regex": "a+", "choice": ["a"]}},
     ("one kind",)),
    ("structured_outputs: unknown key", "completions", lambda r, L: {"structured_outputs": {"frob": 1}},
     ("structured outputs",)),
    ("structured_outputs.json: int", "completions", lambda r, L: {"structured_outputs": {"json": 5}},
     ("structured_outputs.json",)),
    # vllm_xargs
    ("vllm_xargs: str", "completions", lambda r, L: {"vllm_xargs": "notadict"}, ("vllm_xargs",)),
    ("vllm_xargs: nested", "completions", lambda r, L: {"vllm_xargs": {"a": {"b": 1}}}, ("vllm_xargs",)),
    ("vllm_xargs: null", "chat", lambda r, L: {"vllm_xargs": {"a": None}}, ("vllm_xargs",)),
    ("vllm_xargs: list of dict", "completions", lambda r, L: {"vllm_xargs": {"a": [{"b": 1}]}}, ("vllm_xargs",)),
    ("vllm_xargs: int > 64 bits", "completions", lambda r, L: {"vllm_xargs": {"a": 2**70}},
     ("vllm_xargs", "extra_args")),
    # served by stock vLLM by design
    ("unknown field", "completions", lambda r, L: {"frobnicate": r.randint(0, 9)}, (), "accepted"),
    ("unknown field", "chat", lambda r, L: {"not_a_field": {"x": 1}}, (), "accepted"),
    # vLLM 0.32.0 answers HTTP 500 (with and without CoS)
    ("structured_outputs: str", "completions", lambda r, L: {"structured_outputs": "json"},
     ("structured_outputs",), "stock-5xx"),
    ("top_k > 64 bits", "completions", lambda r, L: {"top_k": 2**70}, ("top_k",), "stock-5xx"),
    ("stream_interval > 64 bits", "completions", lambda r, L: {"stream": True, "stream_interval": 2**70},
     ("stream_interval",), "stock-5xx"),
    ("repetition_detection > 64 bits", "completions", lambda r, L: {"repetition_detection": {
        "max_pattern_size": 2**70, "min_count": 2}}, ("repetition_detection", "max_pattern_size"), "stock-5xx"),
]
COS_CASES: list[tuple] = [
    ("thinking_token_budget", "completions", lambda r, L: {"thinking_token_budget": 4}, ("thinking_token_budget",)),
]


def _raw_cases(rng: random.Random, model: str) -> list[BadCase]:
    valid = json.dumps(_base("completions", rng, model)).encode()
    cut = rng.randint(1, len(valid) - 2)
    return [
        BadCase("broken JSON", COMPLETIONS, valid[:cut], ("json",)),
        BadCase("not JSON", CHAT, b"hello, server", ("json",)),
        BadCase("JSON array body", COMPLETIONS, b"[1, 2, 3]", ("dictionary",)),
        BadCase("JSON null body", CHAT, b"null", ("body",)),
        BadCase("NaN temperature", COMPLETIONS, valid[:-1] + b', "temperature": NaN}', ("temperature",)),
        BadCase("deep nesting", COMPLETIONS, b"[" * 100_000 + b"]" * 100_000, ("body",)),
        BadCase("invalid UTF-8", CHAT, b'{"model": "\xff\xfe", "messages": []}', ("body",)),
        BadCase("content type", COMPLETIONS, valid, ("application/json",), content_type="text/plain"),
    ]


def catalogue(rng: random.Random, model: str, max_model_len: int, cos: bool) -> list[BadCase]:
    """Every case once, drawn from ``rng``."""
    cases = _raw_cases(rng, model)
    for name, api, update, keywords, *expect in FIELD_CASES + (COS_CASES if cos else []):
        body = {**_base(api, rng, model), **update(rng, max_model_len)}
        path = CHAT if api == "chat" else COMPLETIONS
        cases.append(BadCase(f"{name} ({api})", path, json.dumps(body).encode(), keywords, *expect))
    return cases


def bad_jobs(n: int, rng: random.Random, model: str, max_model_len: int, cos: bool) -> list[Job]:
    """``n`` bad requests: whole rounds of the catalogue (fresh random values each round), shuffled."""
    out: list[BadCase] = []
    while len(out) < n:
        cases = catalogue(rng, model, max_model_len, cos)
        rng.shuffle(cases)
        out.extend(cases[: n - len(out)])
    return [Job(-1 - i, "raw", {}, bad=case, tags=["bad"]) for i, case in enumerate(out)]


def effective_status(status: int, text: str) -> int:
    """A 200 stream that carries an error event counts as that event's code."""
    if status == 200 and text.startswith("data:") and '"error"' in text:
        for line in text.splitlines():
            if line.startswith("data:") and '"error"' in line:
                try:
                    return int(json.loads(line[5:])["error"].get("code") or 500)
                except (ValueError, KeyError, AttributeError):
                    return 500
    return status


def verdict(case: BadCase, status: int, text: str) -> str:
    """'' when the answer is what ``case`` expects, else what is wrong."""
    named = not case.keywords or any(k.lower() in text.lower() for k in case.keywords)
    if case.expect == "accepted":
        return "" if status == 200 else f"expected 200 (stock ignores it), got {status}"
    if 400 <= status < 500:
        return "" if named else f"{status} but the message names none of {list(case.keywords)}"
    if case.expect == "stock-5xx" and status >= 500:
        return ""
    return f"expected 4xx, got {status}"


def send_bad(http, base: str, job: Job, deadline: float | None = None):
    """POST the case's raw bytes on a fresh connection; an Outcome with the effective status."""
    import time

    from vllm_cos.soak.client import Outcome

    if deadline is not None and time.monotonic() > deadline:
        return Outcome(-2, error="not sent: time limit")
    case = job.bad
    start = time.monotonic()
    try:
        r = http.post(base + case.path, content=case.body,
                      headers={"Content-Type": case.content_type, "Connection": "close"})
    except Exception as exc:  # noqa: BLE001 - a dropped connection is an answer too
        return Outcome(0, error=f"connection: {exc!r}"[:300], latency=time.monotonic() - start)
    status = effective_status(r.status_code, r.text)
    return Outcome(status, latency=time.monotonic() - start, body=r.text[:2000],
                   error=verdict(case, status, r.text))
