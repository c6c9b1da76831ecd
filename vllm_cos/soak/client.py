"""Sending one good request through the ``openai`` client and recording what came back.

No retries (``max_retries=0``: a retry would hide a 5xx), no proxies (``trust_env=False``:
loopback only).  An outcome keeps, per choice, the token ids and the finish reason, which is
what two runs of a request are compared on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vllm_cos.soak.workload import Job


@dataclass
class Outcome:
    """``status``: 200, the HTTP status of an error, 0 for a connection error, -1 for an error
    event inside a stream, -2 for a job not sent (time limit)."""

    status: int
    outputs: tuple = ()  # per choice index: (token ids tuple, finish reason)
    tokens: int = 0
    latency: float = 0.0
    dropped: bool = False  # the client closed the stream before its end
    error: str = ""
    body: str = field(default="", repr=False)  # bad requests: the response text

    @property
    def ok(self) -> bool:
        return self.status == 200


def make_client(base: str, timeout: float, connections: int):
    import httpx
    import openai

    limits = httpx.Limits(max_connections=connections + 8, max_keepalive_connections=connections + 8)
    http = httpx.Client(trust_env=False, limits=limits, timeout=timeout)
    return openai.OpenAI(base_url=base + "/v1", api_key="soak", max_retries=0, timeout=timeout, http_client=http)


def _token_ids(choice) -> list[int]:
    ids = getattr(choice, "token_ids", None)
    if ids is None and getattr(choice, "model_extra", None):
        ids = choice.model_extra.get("token_ids")
    return list(ids or [])


def _outputs(per_index: dict[int, list[int]], finish: dict[int, str | None]) -> tuple:
    return tuple((tuple(per_index.get(i, [])), finish.get(i)) for i in sorted(set(per_index) | set(finish)))


def _plain(client, job: Job) -> tuple:
    create = client.completions.create if job.api == "completions" else client.chat.completions.create
    out = create(**job.kwargs)
    ids = {c.index: _token_ids(c) for c in out.choices}
    finish = {c.index: c.finish_reason for c in out.choices}
    return _outputs(ids, finish), False


def _streamed(client, job: Job) -> tuple:
    create = client.completions.create if job.api == "completions" else client.chat.completions.create
    stream = create(stream=True, **job.kwargs)
    ids: dict[int, list[int]] = {}
    finish: dict[int, str | None] = {}
    chunks = 0
    try:
        for chunk in stream:
            chunks += 1
            for c in chunk.choices:
                ids.setdefault(c.index, []).extend(_token_ids(c))
                if c.finish_reason is not None:
                    finish[c.index] = c.finish_reason
            if job.drop_after is not None and chunks >= job.drop_after:
                n = job.kwargs.get("n", 1)
                if len(finish) < n:  # still going: hang up
                    stream.close()
                    return _outputs(ids, finish), True
    finally:
        stream.close()
    return _outputs(ids, finish), False


def send(client, job: Job, deadline: float | None = None, drop: bool = True) -> Outcome:
    """Run ``job``; ``drop=False`` reads a stream to its end (the re-sends)."""
    import openai

    if deadline is not None and time.monotonic() > deadline:
        return Outcome(-2, error="not sent: time limit")
    if not drop and job.drop_after is not None:
        job = Job(job.index, job.api, job.kwargs, job.stream, None, tags=job.tags)
    start = time.monotonic()
    try:
        outputs, dropped = (_streamed if job.stream else _plain)(client, job)
    except openai.APIStatusError as exc:
        return Outcome(exc.status_code, error=str(exc)[:500], latency=time.monotonic() - start)
    except openai.APIConnectionError as exc:
        return Outcome(0, error=f"connection: {exc!r}"[:500], latency=time.monotonic() - start)
    except openai.APIError as exc:  # an error event inside a stream
        return Outcome(-1, error=f"stream error: {exc}"[:500], latency=time.monotonic() - start)
    tokens = sum(len(ids) for ids, _ in outputs)
    return Outcome(200, outputs, tokens, time.monotonic() - start, dropped)
