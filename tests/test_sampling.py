import torch

from stats import P_THRESHOLD, chi2_pvalue
from vllm_cos.sampling import apply_sampling_params, draw_uniforms, sample_from_probs


def test_temperature_and_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    probs = apply_sampling_params(logits, torch.tensor([0.5, 0.0]))
    assert torch.allclose(probs[0], torch.softmax(logits[0] / 0.5, -1))
    assert probs[1].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_the_batch_flags_give_the_same_distributions():
    # all_greedy True (vLLM's all_greedy) skips softmax and masks; False (all_random) skips the
    # greedy check; both must equal the checked result on the batches they describe
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    logits[2, 7] = float("-inf")
    top_k, top_p, min_p = torch.tensor([0, 3, 0, 5, 0, 0]), torch.tensor([1.0, 1.0, 0.8, 1.0, 0.5, 1.0]), \
        torch.tensor([0.0, 0.0, 0.0, 0.1, 0.0, 0.3])
    zeros = torch.zeros(6)
    assert torch.equal(apply_sampling_params(logits, zeros, top_k, top_p, min_p, all_greedy=True),
                       apply_sampling_params(logits, zeros, top_k, top_p, min_p))
    tempered = torch.tensor([0.5, 1.0, 1.5, 0.7, 1.0, 2.0])
    assert torch.equal(apply_sampling_params(logits, tempered, top_k, top_p, min_p, all_greedy=False),
                       apply_sampling_params(logits, tempered, top_k, top_p, min_p))


def test_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.3, 0.2]] * 3))
    probs = apply_sampling_params(logits, torch.ones(3), top_k=torch.tensor([2, 0, 0]),
                                  top_p=torch.tensor([1.0, 0.65, 1.0]))
    assert torch.allclose(probs[0], torch.tensor([0.0, 4 / 7, 3 / 7, 0.0]))
    # top_p 0.65: 0.4 + 0.3 reach it, 0.2 and 0.1 are cut
    assert torch.allclose(probs[1], torch.tensor([0.0, 4 / 7, 3 / 7, 0.0]))
    assert torch.allclose(probs[2], torch.tensor([0.1, 0.4, 0.3, 0.2]))


def test_top_p_keeps_the_best_token_and_masked_tokens_stay_masked():
    logits = torch.tensor([[0.0, 5.0, float("-inf"), 1.0]])
    probs = apply_sampling_params(logits, torch.ones(1), top_p=torch.tensor([0.01]))
    assert probs[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    probs = apply_sampling_params(logits, torch.ones(1))
    assert probs[0, 2] == 0.0


def test_inverse_cdf_sampling_is_exact():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    n = 100_000
    tokens = sample_from_probs(probs.expand(n, 5) * 3.0, torch.rand(n, dtype=torch.float64))  # unnormalised rows
    counts = torch.bincount(tokens, minlength=5)
    assert counts[1] == 0 and counts[4] == 0
    assert chi2_pvalue(counts, probs) > P_THRESHOLD


def test_draw_uniforms_per_generator():
    a = draw_uniforms([3, 2], [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    b = draw_uniforms([3], [torch.Generator().manual_seed(1)])
    assert torch.equal(a[0], b[0]) and a[1].shape == (2,)
    c = draw_uniforms([2, 4], None)
    assert [x.shape[0] for x in c] == [2, 4] and all(((x >= 0) & (x < 1)).all() for x in c)


def test_min_p_drops_tokens_below_its_share_of_the_best_after_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = apply_sampling_params(logits, torch.tensor([1.0]), min_p=torch.tensor([0.4]))
    # threshold 0.4 * 0.5 = 0.2: tokens 2 and 3 go, the rest renormalise
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    hot = apply_sampling_params(logits, torch.tensor([2.0]), min_p=torch.tensor([0.4]))
    assert (hot[0, :3] > 0).all() and hot[0, 3] == 0  # tempered first: 0.15 survives at T=2
    greedy = apply_sampling_params(logits, torch.tensor([0.0]), min_p=torch.tensor([0.9]))
    assert greedy.tolist() == [[1.0, 0.0, 0.0, 0.0]]
