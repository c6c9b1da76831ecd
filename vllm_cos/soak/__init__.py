"""Reliability soak of a CoS server: load with preemption and dropped streams, bad requests,
token identity of greedy and seeded requests against the idle server, end state, memory.

Run it as ``.venv/bin/python scripts/soak.py`` (``--help``); :mod:`vllm_cos.soak.runner` has the
plan, :mod:`~vllm_cos.soak.workload` the good requests, :mod:`~vllm_cos.soak.bad` the bad ones,
:mod:`~vllm_cos.soak.server` the server, :mod:`~vllm_cos.soak.report` the assertions and table.
"""
