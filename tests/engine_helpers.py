"""Shared by the engine test modules: prompts, one live offline engine, greedy runs, r itself."""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from pathlib import Path

import torch

from vllm_cos.offline import shutdown_llm

# The tiny models are trained on Python source.
CODE_PROMPTS = [
    "def main(", "import os\nimport sys\n", "class Foo:\n    def __init__(self", "for i in range(10):\n",
    "return self.", "if __name__ == '__main__':\n", "    def __repr__(self):\n        return ", "x = [",
    "from collections import ", "try:\n    ", "with open(path) as f:\n", "raise ValueError(",
    "    @property\n    def ", "print(", "while True:\n    ", "lambda x: ", "assert isinstance(",
    "elif ", "yield from ", "self.assertEqual(",
]
PROMPT_FOR_SAMPLING = "import os\nimport sys\n\n\ndef main():\n    "


class OneEngine:
    """At most one offline engine alive (the machine has 2 cores); ``get(*key)`` starts the
    engine for ``make_spec(*key)`` unless it is the live one."""

    def __init__(self, served_path, make_spec):
        self.served_path = str(served_path)
        self.make_spec = make_spec
        self.key = self.llm = None

    def get(self, *key):
        if self.key != key:
            spec = self.make_spec(*key)
            self.close()
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            from vllm import LLM

            self.llm = LLM(model=self.served_path, speculative_config=spec, dtype="float32", enforce_eager=True,
                           max_model_len=256, max_num_seqs=64, gpu_memory_utilization=0.2, seed=0,
                           enable_prefix_caching=False)
            self.key = key
        return self.llm

    def close(self):
        shutdown_llm(self.llm)
        self.key = self.llm = None


def greedy(llm, prompts, max_tokens: int, batch: bool) -> list[list[int]]:
    """Greedy token ids per prompt: all prompts as one batch, or one request at a time."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    if batch:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]
    return [list(llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)[0].outputs[0].token_ids)
            for p in prompts]


def greedy_identity(llm, prompts, max_tokens: int, expected: list[list[int]], label: str) -> list[list[int]]:
    """Greedy outputs of ``prompts`` one at a time; asserts they equal ``expected`` and that the
    first 16 as one batch give the same tokens.  Returns the single-request outputs."""
    single = greedy(llm, prompts, max_tokens, batch=False)
    batch = greedy(llm, prompts[:16], max_tokens, batch=True)
    mismatches = [i for i, (a, b) in enumerate(zip(single, expected)) if a != b]
    assert not mismatches, f"{label}: prompts {mismatches} differ from the reference"
    assert batch == single[:16], f"{label}: a batch of 16 differs from single requests"
    return single


def r_next_rows(cfg, contexts: list[list[int]], temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0) -> torch.Tensor:
    """r(. | context) of a CoS config for equal-length ``contexts``, tempered, from transformers
    models (float64 [N, vocab])."""
    from transformers import AutoModelForCausalLM

    from vllm_cos.combine import build_combiner
    from vllm_cos.sampling import apply_sampling_params

    logits = []
    for spec in cfg.models:
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32)
        with torch.no_grad():
            logits.append(model(torch.tensor(contexts)).logits[:, -1])
    combined = build_combiner(cfg.rule, cfg.model_names)(torch.stack(logits))
    n = len(contexts)
    return apply_sampling_params(combined, torch.full((n,), temperature), torch.full((n,), top_k),
                                 torch.full((n,), top_p)).double()


def r_next(cfg, token_ids: list[int], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """r(. | token_ids) of a CoS config, tempered, from transformers models (float64 [vocab])."""
    return r_next_rows(cfg, [token_ids], temperature, top_k, top_p)[0]


def r_second_token(cfg, token_ids: list[int]) -> torch.Tensor:
    """The marginal of the second token generated after ``token_ids`` at T = 1:
    sum over t of r(t | prompt) r(. | prompt + t) (float64 [vocab])."""
    first = r_next(cfg, token_ids)
    support = first.nonzero().squeeze(1).tolist()
    second = r_next_rows(cfg, [token_ids + [t] for t in support])
    return first[support] @ second


def reference_log_r(cfg, token_ids: list[int]) -> torch.Tensor:
    """log r [len(token_ids), vocab] at every position of ``token_ids`` (transformers models)."""
    from transformers import AutoModelForCausalLM

    from vllm_cos.combine import build_combiner

    logits = []
    for spec in cfg.models:
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32)
        with torch.no_grad():
            logits.append(model(torch.tensor([token_ids])).logits[0])
    return torch.log_softmax(build_combiner(cfg.rule, cfg.model_names)(torch.stack(logits)), dim=-1)


def assert_prompt_logprobs_are_log_r(llm, prompts, log_r_of, tolerance: float = 2e-3) -> None:
    """prompt_logprobs=5: every prompt token's logprob (and the clear top 5) is ``log_r_of(prompt)``,
    for one request alone and for ``prompts`` as one batch (the second also asks for logprobs)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=5, logprobs=2 if i == 1 else None)
              for i in range(len(prompts))]
    outs = []
    for chunk, chunk_params in ((prompts[:1], params[:1]), (prompts, params)):
        outs += llm.generate([TokensPrompt(prompt_token_ids=p) for p in chunk], chunk_params, use_tqdm=False)
    worst = 0.0
    for prompt, o in zip(prompts[:1] + prompts, outs):
        assert o.prompt_logprobs is not None and len(o.prompt_logprobs) == len(prompt)
        assert o.prompt_logprobs[0] is None
        log_r = log_r_of(prompt)
        for i in range(1, len(prompt)):
            entry, ref = o.prompt_logprobs[i], log_r[i - 1]
            values, indices = torch.topk(ref, 6)
            clear = [t for t, v in zip(indices[:5].tolist(), values[:5].tolist()) if v - float(values[5]) > 1e-3]
            assert set(clear) <= set(entry), (i, clear, set(entry))
            worst = max([worst] + [abs(entry[t].logprob - float(ref[t])) for t in clear + [prompt[i]]])
    assert worst < tolerance, f"prompt logprobs differ from log r by {worst}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(proc, base: str, log_path: Path, timeout: float = 420) -> None:
    """Until ``base``/health answers 200; raises with the log's tail if the server exits or stalls."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + Path(log_path).read_text()[-3000:])
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    proc.terminate()
    raise RuntimeError("server did not start:\n" + Path(log_path).read_text()[-3000:])


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except Exception:  # noqa: BLE001 - still running: kill it
        proc.kill()
