"""The good requests of a soak: a seeded mix of the OpenAI API's features.

Completions and chat, streaming and not; temperature 0 / 0.7 / 1 with top-p, top-k and seeds;
stop strings, max_tokens 1..200, n > 1 (never at temperature 0: vLLM refuses n > 1 with greedy
sampling), logprobs, structured outputs (``structured_outputs`` regex / choice / JSON schema
for completions, ``response_format`` json_schema or ``structured_outputs`` choice for chat);
a share of the streams is closed by the client after a few chunks.  Every request asks for
``return_token_ids`` so that outputs are compared token by token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

PROMPTS = [
    "def main(", "import os\nimport sys\n", "class Foo:\n    def __init__(self", "for i in range(10):\n",
    "return self.", "if __name__ == '__main__':\n", "    def __repr__(self):\n        return ", "x = [",
    "from collections import ", "try:\n    ", "with open(path) as f:\n", "raise ValueError(",
    "    @property\n    def ", "print(", "while True:\n    ", "lambda x: ", "assert isinstance(",
    "elif ", "yield from ", "self.assertEqual(", "def fibonacci(n):\n    ", "import json\n\n\ndef load(",
    "class Config:\n    def __init__(self, path):\n        self.path = path\n", "    except KeyError:\n        ",
]
STOPS = [["\n\n"], ["return"], [")", ":"], ["def "], ["\n"]]
JSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                "size": {"type": "integer"}}, "required": ["name", "size"]}
CHOICES = ["yes", "no", "maybe", "def", "class"]
REGEX = r"[a-z_]{1,12}\([0-9]{1,3}\)"
VOCAB = 512  # the tiny models' vocabulary


@dataclass
class Job:
    """One request: ``api`` 'completions' | 'chat', openai ``create`` keyword arguments."""

    index: int
    api: str
    kwargs: dict
    stream: bool = False
    drop_after: int | None = None  # streams: chunks received before the client closes the stream
    bad: object = None  # a bad.BadCase instead of a good request
    tags: list[str] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.bad is None and self.kwargs.get("temperature") == 0

    @property
    def seeded(self) -> bool:
        return self.bad is None and self.kwargs.get("seed") is not None and not self.greedy


def _max_tokens(rng: random.Random) -> int:
    """1..200, skewed short (mean about 60): half of them 1..32."""
    r = rng.random()
    if r < 0.5:
        return rng.randint(1, 32)
    if r < 0.85:
        return rng.randint(33, 128)
    return rng.randint(129, 200)


def _sampling(rng: random.Random, kwargs: dict, extra: dict, tags: list[str]) -> None:
    temperature = rng.choices([0.0, 0.7, 1.0], weights=[4, 3, 3])[0]
    kwargs["temperature"] = temperature
    tags.append(f"T={temperature:g}")
    if temperature == 0:
        return
    if rng.random() < 0.5:
        kwargs["top_p"] = rng.choice([0.8, 0.9, 0.95])
        tags.append("top_p")
    if rng.random() < 0.4:
        extra["top_k"] = rng.choice([5, 20, 50])
        tags.append("top_k")
    if rng.random() < 0.5:
        kwargs["seed"] = rng.randrange(2**31)
        tags.append("seed")
    if rng.random() < 0.2:
        kwargs["n"] = rng.choice([2, 3])
        tags.append("n>1")


def _structured(rng: random.Random, api: str, kwargs: dict, extra: dict, tags: list[str]) -> None:
    kind = rng.choice(["json", "regex", "choice"] if api == "completions" else ["json", "choice"])
    tags.append(f"structured:{kind}")
    if api == "chat" and kind == "json":
        kwargs["response_format"] = {"type": "json_schema", "json_schema": {"name": "item", "schema": JSON_SCHEMA}}
    else:
        spec = {"json": JSON_SCHEMA, "regex": REGEX, "choice": CHOICES}[kind]
        extra["structured_outputs"] = {kind: spec}


def _prompt(rng: random.Random, api: str, kwargs: dict, tags: list[str]) -> None:
    text = rng.choice(PROMPTS)
    if api == "chat":
        kwargs["messages"] = [{"role": "user", "content": text}]
    elif rng.random() < 0.15:
        kwargs["prompt"] = [rng.randrange(2, VOCAB) for _ in range(rng.randint(3, 24))]
        tags.append("token-ids")
    else:
        kwargs["prompt"] = text


def _logprobs(rng: random.Random, api: str, kwargs: dict, tags: list[str]) -> None:
    k = rng.randint(0, 5)
    tags.append("logprobs")
    if api == "chat":
        kwargs["logprobs"] = True
        kwargs["top_logprobs"] = k
    else:
        kwargs["logprobs"] = k


def good_job(index: int, rng: random.Random, model: str, drop_share: float) -> Job:
    api = "completions" if rng.random() < 0.6 else "chat"
    stream = rng.random() < 0.5
    tags = [api, "stream" if stream else "plain"]
    kwargs: dict = {"model": model, "max_tokens": _max_tokens(rng)}
    extra: dict = {"return_token_ids": True}
    _prompt(rng, api, kwargs, tags)
    _sampling(rng, kwargs, extra, tags)
    if rng.random() < 0.2:
        kwargs["stop"] = rng.choice(STOPS)
        tags.append("stop")
    if rng.random() < 0.2:
        _logprobs(rng, api, kwargs, tags)
    if rng.random() < 0.12:
        _structured(rng, api, kwargs, extra, tags)
    if rng.random() < 0.3:
        extra["ignore_eos"] = True
    drop_after = None
    if stream and rng.random() < drop_share:
        drop_after = rng.randint(1, 4)
        kwargs["max_tokens"] = max(kwargs["max_tokens"], 48)
        for key in ("stop", "response_format"):  # nothing that could end it before the drop
            kwargs.pop(key, None)
        extra.pop("structured_outputs", None)
        extra["ignore_eos"] = True
        tags.append("drop")
    kwargs["extra_body"] = extra
    return Job(index, api, kwargs, stream=stream, drop_after=drop_after, tags=tags)


def good_jobs(n: int, rng: random.Random, model: str, drop_share: float) -> list[Job]:
    return [good_job(i, rng, model, drop_share) for i in range(n)]


def interleave(good: list[Job], bad: list[Job], rng: random.Random) -> list[Job]:
    """Bad jobs spread at random positions between the good ones (order of each kept)."""
    slots = sorted(rng.sample(range(len(good) + len(bad)), len(bad)))
    out, gi, bi = [], iter(good), iter(bad)
    marks = set(slots)
    for pos in range(len(good) + len(bad)):
        out.append(next(bi) if pos in marks else next(gi))
    return out
