"""Prompt logprobs of r (vllm_cos.adapters.prompt_logprobs) on a hand-made runner: the group's
scores are handed over once per step, r = the combination of T's and the group's logits, and
a prompt scored in two chunks is returned complete with the last chunk."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_cos.adapters.prompt_logprobs import PromptScores, cos_prompt_logprobs
from vllm_cos.adapters.step import StepInvariantError

VOCAB = 6


class _Core:
    """combine = log_softmax(T + group member 0): easy to recompute by hand."""

    def __init__(self):
        self.prompt_scores = PromptScores()

    def crop(self, logits):
        return logits[..., :VOCAB].float()

    def combine(self, target_logits, group_logits, row_params=None):
        assert row_params is None  # no request here sets its own rule parameters
        return torch.log_softmax(target_logits + group_logits[0], dim=-1)

    def request_overrides(self, runner, req_ids, device):
        return None


def _runner(prompt, hidden, computed, k=2):
    model = SimpleNamespace(compute_logits=lambda h: h * 1.0)  # the "hidden states" are T's logits
    request = SimpleNamespace(prompt_token_ids=prompt, num_computed_tokens=computed,
                              in_progress_prompt_logprobs_cpu=None)
    return SimpleNamespace(num_prompt_logprobs={"a": k}, requests={"a": request}, model=model,
                           input_batch=SimpleNamespace(req_id_to_index={"a": 0}),
                           query_start_loc=SimpleNamespace(np=np.array([0, hidden.shape[0]])),
                           model_config=SimpleNamespace(logprobs_mode="raw_logprobs"))


def test_prompt_scores_handoff_is_asserted():
    scores = PromptScores()
    with pytest.raises(StepInvariantError, match="prompt-scores"):
        scores.take("x")
    scores.put("x", torch.zeros(1, 2, VOCAB))
    with pytest.raises(StepInvariantError, match="prompt-scores-consumed"):
        scores.clear()
    scores.take("x")
    scores.clear()


def test_two_chunks_give_log_r_at_every_prompt_position():
    torch.manual_seed(0)
    prompt = [1, 4, 2, 5, 0]
    target = torch.randn(len(prompt), VOCAB + 2)  # padded vocab, cropped by the core
    group = torch.randn(1, len(prompt), VOCAB)
    expected = torch.log_softmax(target[:, :VOCAB] + group[0], dim=-1)
    core = _Core()

    runner = _runner(prompt, target[:3], computed=0)  # chunk 1: prompt tokens 0..2
    core.prompt_scores.put("a", group[:, :3])
    assert cos_prompt_logprobs(runner, core, target[:3], {"a": 3}) == {}
    partial = runner.requests["a"].in_progress_prompt_logprobs_cpu
    assert partial is not None and "a" in runner.num_prompt_logprobs

    runner.requests["a"].num_computed_tokens = 3  # chunk 2: tokens 3..4 (and the first output)
    runner.query_start_loc.np = np.array([0, 2])
    core.prompt_scores.put("a", group[:, 3:])
    done = cos_prompt_logprobs(runner, core, target[3:], {"a": 2})
    assert set(done) == {"a"} and runner.num_prompt_logprobs == {}
    got = done["a"]
    assert got.logprobs.shape == (len(prompt) - 1, 3)
    for i in range(len(prompt) - 1):  # column 0: the prompt token that follows position i
        assert int(got.logprob_token_ids[i, 0]) == prompt[i + 1]
        assert float(got.logprobs[i, 0]) == pytest.approx(float(expected[i, prompt[i + 1]]), abs=1e-6)
        top = torch.topk(expected[i], 2).indices.tolist()
        assert got.logprob_token_ids[i, 1:].tolist() == top
    core.prompt_scores.clear()  # every score was taken


def test_missing_group_scores_raise():
    prompt = [1, 2, 3]
    runner = _runner(prompt, torch.zeros(3, VOCAB), computed=0)
    with pytest.raises(StepInvariantError, match="prompt-scores"):
        cos_prompt_logprobs(runner, _Core(), torch.zeros(3, VOCAB), {"a": 3})
