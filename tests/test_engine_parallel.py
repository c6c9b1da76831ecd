"""Tensor parallelism: ``tensor_parallel_size=2`` (vLLM's CPU backend runs the ranks as
processes; every collaborator is sharded like the served model) gives the same greedy and the
same seeded T = 1 tokens as one rank, with a fixed gamma (``gamma: auto`` is refused under
tensor parallelism: each rank would time its own steps); ``cos_stats`` answers from rank 0 only
(every rank counts the same tokens), with the counters of one rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams

def main():
    llm = LLM(model=sys.argv[1], speculative_config=json.loads(sys.argv[2]), dtype="float32", enforce_eager=True,
              gpu_memory_utilization=0.2, max_model_len=256, tensor_parallel_size=int(sys.argv[3]))
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=5, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=9, max_tokens=24, ignore_eos=True)]
    outs = llm.generate(["def main(", "import os\\n", "def main("], params)
    from vllm_cos.offline import cos_stats
    stats = cos_stats(llm)
    print("RESULT", json.dumps([[list(o.outputs[0].token_ids) for o in outs], stats]))

if __name__ == "__main__":
    main()
"""


def _run(tiny_models, tmp_path: Path, tp: int) -> list[list[int]]:
    script = tmp_path / "tp.py"
    script.write_text(SCRIPT)
    spec = {"models": [{"name": "large", "path": str(tiny_models["large"]), "gamma": 1},
                       {"name": "small", "path": str(tiny_models["small"]), "gamma": 3}],
            "rule": {"name": "weighted_ensemble", "weights": {"large": 0.5, "small": 0.5}}, "schedule": "alternate"}
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    if tp == 2:  # one core per rank (vLLM cannot bind two ranks on a single NUMA node by itself)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # tensor parallel ranks are processes
    proc = subprocess.run([sys.executable, str(script), str(tiny_models["large"]), json.dumps(spec), str(tp)],
                          capture_output=True, text=True, timeout=420, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):])


# fixed by the tokens (greedy, and seeded draws keyed by position): equal across rank counts
COUNTED = ("drafts_proposed", "drafts_accepted", "tokens_emitted")
# fixed by the scheduling too: the engine core may step before the last prompt arrives over its
# socket, so these may differ by a step or two; summed over two ranks they would double
SCHEDULED = ("steps", "draft_forwards", "row_steps")


def test_two_ranks_equal_one(tiny_models, tmp_path):
    (two, two_stats), (one, one_stats) = _run(tiny_models, tmp_path, 2), _run(tiny_models, tmp_path, 1)
    assert two == one
    assert len(two_stats) == 2 and two_stats[1] is None, "rank 1 answered cos_stats: its counts would add twice"
    assert {k: two_stats[0][k] for k in COUNTED} == {k: one_stats[0][k] for k in COUNTED}
    for key in SCHEDULED:
        assert one_stats[0][key] / 1.4 < two_stats[0][key] < 1.4 * one_stats[0][key], (key, two_stats, one_stats)
    # at least the 64 tokens returned (a last step's accepted drafts past max_tokens count too)
    assert one_stats[0]["tokens_emitted"] >= 16 + 24 + 24
