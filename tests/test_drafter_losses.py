"""vllm_cos.drafter_losses on hand-made tensors (V = 3, gamma = 2); expected values written out."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vllm_cos.drafter_losses import (acceptance_probs, chain_loss, divergence_per_position, drafter_loss,
                                     expected_accepted_length, first_error_focal, first_error_mask,
                                     positional_weights)

# Block A: both positions, hand-picked q and r.
#   position 1: q = [.2, .5, .3], r = [.5, .3, .2]   argmax q = 1 != argmax r = 0 -> wrong
#   position 2: q = [.2, .45, .35], r = [.1, .6, .3] argmax 1 == 1                -> right
Q_A = [[0.2, 0.5, 0.3], [0.2, 0.45, 0.35]]
R_A = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]
# alpha_1 = min(.2,.5) + min(.5,.3) + min(.3,.2) = .2 + .3 + .2 = .7
# alpha_2 = min(.2,.1) + min(.45,.6) + min(.35,.3) = .1 + .45 + .3 = .85
ALPHA_A = [0.7, 0.85]
# TV_1 = (|.2-.5| + |.5-.3| + |.3-.2|) / 2 = (.3 + .2 + .1) / 2 = .3 ; TV_2 = (.1 + .15 + .05) / 2 = .15
TV_A = [0.3, 0.15]
# KL(r || q) = sum r log(r / q)
KL_A = [0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3),
        0.1 * math.log(0.1 / 0.2) + 0.6 * math.log(0.6 / 0.45) + 0.3 * math.log(0.3 / 0.35)]


def logits_of(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def block_a():
    return logits_of([Q_A]), torch.tensor([R_A], dtype=torch.float64)  # [1, 2, 3] each


def test_acceptance_tv_kl_by_hand():
    draft_logits, combined = block_a()
    alpha = acceptance_probs(torch.softmax(draft_logits, -1), combined)
    assert torch.allclose(alpha, torch.tensor([ALPHA_A], dtype=torch.float64))
    tv = divergence_per_position(draft_logits, combined, "tv")
    assert torch.allclose(tv, torch.tensor([TV_A], dtype=torch.float64))
    kl = divergence_per_position(draft_logits, combined, "kl")
    assert torch.allclose(kl, torch.tensor([KL_A], dtype=torch.float64), atol=1e-6)
    # The reverse direction KL(q || r) differs on this example (the forward one is asked for).
    reverse = 0.2 * math.log(0.2 / 0.5) + 0.5 * math.log(0.5 / 0.3) + 0.3 * math.log(0.3 / 0.2)
    assert abs(kl[0, 0].item() - reverse) > 1e-2


def test_divergences_zero_when_q_equals_r_and_zero_mass_tokens():
    combined = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]])
    draft_logits = torch.tensor([[[0.0, 0.0, -1e4], [0.2, 0.3, 0.5]]]).clone()
    draft_logits[0, 1] = draft_logits[0, 1].log()
    for name in ("kl", "tv"):
        div = divergence_per_position(draft_logits, combined, name)
        assert torch.isfinite(div).all() and torch.allclose(div, torch.zeros(1, 2), atol=1e-6), name
    assert torch.allclose(acceptance_probs(torch.softmax(draft_logits, -1), combined), torch.ones(1, 2))
    with pytest.raises(ValueError, match="divergence"):
        divergence_per_position(draft_logits, combined, "js")


def test_chain_loss_is_minus_alpha1_plus_alpha1_alpha2():
    draft_logits, combined = block_a()
    # -(alpha_1 + alpha_1 * alpha_2) = -(.7 + .7 * .85) = -(.7 + .595) = -1.295
    assert chain_loss(draft_logits, combined).item() == pytest.approx(-1.295, abs=1e-9)
    alpha = torch.tensor([[0.5, 0.4, 0.9]])
    # .5 + .5*.4 + .5*.4*.9 = .5 + .2 + .18 = .88
    assert expected_accepted_length(alpha).item() == pytest.approx(0.88)


def test_positional_weights():
    # decay .5, gamma 3: [1, .5, .25] / 1.75 = [4/7, 2/7, 1/7] -- earliest position heaviest
    assert torch.allclose(positional_weights(3, 0.5), torch.tensor([4 / 7, 2 / 7, 1 / 7]))
    assert torch.allclose(positional_weights(4), torch.full((4,), 0.25))
    assert torch.allclose(positional_weights(2, 1.0), torch.tensor([0.5, 0.5]))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="positional decay"):
            positional_weights(3, bad)
    with pytest.raises(ValueError, match="gamma"):
        positional_weights(0)


def three_blocks():
    """A (wrong at 1), B (right at 1, wrong at 2), C (wrong at 1 and 2), D (never wrong)."""
    q_b = [[0.6, 0.3, 0.1], [0.5, 0.3, 0.2]]
    r_b = [[0.6, 0.3, 0.1], [0.1, 0.6, 0.3]]
    q_c, r_c = [Q_A[0], q_b[1]], [R_A[0], r_b[1]]
    q_d, r_d = [[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]], [[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]
    draft_logits = logits_of([Q_A, q_b, q_c, q_d]).requires_grad_(True)
    combined = torch.tensor([R_A, r_b, r_c, r_d], dtype=torch.float64)
    return draft_logits, combined


def test_first_error_mask_selects_the_first_wrong_position_only():
    draft_logits, combined = three_blocks()
    mask = first_error_mask(draft_logits, combined)
    expected = torch.tensor([[True, False], [False, True], [True, False], [False, False]])
    assert torch.equal(mask, expected)


def test_first_error_focal_value_and_gradient():
    draft_logits, combined = three_blocks()
    per_position = divergence_per_position(draft_logits, combined, "kl").detach()
    # (D_A1 + D_B2 + D_C1 + 0) / 4 blocks
    expected = (per_position[0, 0] + per_position[1, 1] + per_position[2, 0]) / 4
    focal = first_error_focal(draft_logits, combined, "kl")
    assert focal.item() == pytest.approx(expected.item())
    assert per_position[2, 1] > 0 and per_position[3].sum() > 0  # unselected positions do cost something
    focal.backward()
    grad_norm = draft_logits.grad.norm(dim=-1)  # [4, 2]
    assert torch.isfinite(draft_logits.grad).all()
    assert (grad_norm[[0, 1, 2], [0, 1, 0]] > 1e-3).all()
    assert torch.all(grad_norm[[0, 1, 2, 3, 3], [1, 0, 1, 0, 1]] == 0)
    # KL(r || softmax(z)) / 4 has gradient (q - r) / 4 at the selected position
    q_a1 = torch.tensor(Q_A[0], dtype=torch.float64)
    assert torch.allclose(draft_logits.grad[0, 0], (q_a1 - torch.tensor(R_A[0], dtype=torch.float64)) / 4)


def test_gradients_flow_and_stop_at_the_target():
    draft_logits, combined = three_blocks()
    combined.requires_grad_(True)
    for name in ("kl", "tv"):
        draft_logits.grad = None
        divergence_per_position(draft_logits, combined, name).sum().backward()
        assert torch.isfinite(draft_logits.grad).all() and draft_logits.grad.abs().sum() > 1e-3, name
    draft_logits.grad = None
    chain_loss(draft_logits, combined).backward()
    grad = draft_logits.grad
    grad_norm = grad.norm(dim=-1)  # [4, 2]; block B position 1 has q = r (a kink of min)
    assert torch.isfinite(grad).all() and (grad_norm[[0, 0, 1, 2, 2], [0, 1, 1, 0, 1]] > 1e-3).all()
    assert combined.grad is None  # r is a constant target


def test_chain_gradient_matches_hand_derivative():
    # One block, gamma 2: d(-(a1 + a1 a2))/d a1 = -(1 + a2); pushing q_1 toward r_1 along the
    # token with q < r raises a1 by dq, so the loss drops by (1 + a2) dq.
    draft_logits, combined = block_a()
    draft_logits.requires_grad_(True)
    loss = chain_loss(draft_logits, combined)
    loss.backward()
    q1 = torch.tensor(Q_A[0], dtype=torch.float64)
    # a1 = q(0) + r(1) + r(2) (q < r only at token 0): d a1 / d z = q0 * (e_0 - q)
    d_alpha1 = q1[0] * (torch.tensor([1.0, 0, 0], dtype=torch.float64) - q1)
    assert torch.allclose(draft_logits.grad[0, 0], -(1 + ALPHA_A[1]) * d_alpha1)


def test_drafter_loss_combines_the_parts():
    draft_logits, combined = block_a()
    loss, parts = drafter_loss(draft_logits, combined, divergence="tv")
    assert loss.item() == pytest.approx((0.3 + 0.15) / 2)  # uniform weights
    assert parts["acceptance"] == pytest.approx((0.7 + 0.85) / 2)
    assert parts["accepted_length"] == pytest.approx(1.295)
    loss, parts = drafter_loss(draft_logits, combined, divergence="tv", positional=0.5)
    assert loss.item() == pytest.approx(0.3 * 2 / 3 + 0.15 / 3)  # w = [1, .5] / 1.5
    loss, parts = drafter_loss(draft_logits, combined, divergence="kl", positional=0.5, focal=2.0, chain=3.0)
    distill = KL_A[0] * 2 / 3 + KL_A[1] / 3
    # focal: block A is first wrong at position 1 -> KL_A[0] / 1 block
    assert parts["distill"] == pytest.approx(distill) and parts["focal"] == pytest.approx(KL_A[0])
    assert parts["chain"] == pytest.approx(-1.295)
    assert loss.item() == pytest.approx(distill + 2.0 * KL_A[0] - 3.0 * 1.295)
    with pytest.raises(ValueError, match="gamma, V"):
        drafter_loss(draft_logits[0], combined[0])


def test_pure_torch_module():
    import ast

    source = Path(__file__).resolve().parents[1] / "vllm_cos" / "drafter_losses.py"
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    assert names <= {"__future__", "torch", "math", "typing"}, names
