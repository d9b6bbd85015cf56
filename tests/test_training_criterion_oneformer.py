"""The shared matcher and criterion against transformers' OneFormerLoss (matcher costs and assignments,
cross-entropy, mask BCE, dice, final and every auxiliary prediction, the contrastive term with its logit
scale) in float64 on the same inputs with the same injected points.

Where transformers computes in float32 whatever the input dtype, we compare at the bound that implies:

- ``OneFormerHungarianMatcher`` samples the masks in the input dtype, then casts them to float32 and computes
  the BCE and dice costs in float32 (autocast off); only the class cost stays float64. Our float64 costs
  differ by the float32 rounding of those two terms: 8 float32 ulps of each term's scale, times its weight.
  The assignments are the same.
- ``OneFormerLoss.get_num_masks`` returns a float32 tensor of shape (1,), which makes the mask and dice
  losses float32 (type promotion with a 0-dim float64 sum): compared at float32 rounding, and exactly
  (1e-12) once that normaliser is float64.
- ``loss_contrastive`` casts the image queries to float32 (and needs float32 text queries): float32
  rounding. The float64 formula itself is checked in tests/test_training_contrastive.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from criterion_helpers import Replay, make_case, recorded_draws
from maskformers.training.contrastive import ContrastiveLoss
from maskformers.training.criterion import MaskFormerCriterion, weighted_total
from maskformers.training.matcher import HungarianMatcher
from tolerances import FLOAT32_ULPS, assert_float32_rounding

transformers = pytest.importorskip("transformers")
from transformers.models.oneformer import modeling_oneformer as hf  # noqa: E402

F64 = dict(rtol=1e-12, atol=1e-12)
EPS32 = torch.finfo(torch.float32).eps
WEIGHTS = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0, "loss_contrastive": 0.5}


def _case(seed, **kw):
    outputs, targets = make_case(seed, **kw)
    B, Q = outputs["class_logits"].shape[:2]
    g = torch.Generator().manual_seed(seed + 1000)
    outputs["contrastive_queries"] = torch.randn(B, Q, 8, generator=g, dtype=torch.float64)
    outputs["text_queries"] = torch.randn(B, Q, 8, generator=g, dtype=torch.float64)
    return outputs, targets


def _float64_num_masks(self, class_labels, device):
    """transformers' normaliser (number of target masks, at least 1) as a float64 scalar."""
    return torch.clamp(torch.as_tensor(float(sum(len(c) for c in class_labels)), dtype=torch.float64), min=1)


def _run_hf(outputs, targets, draws, monkeypatch, *, num_points, logit_scale=None, float64_num_masks=False):
    """transformers' losses, and the (costs, assignment) of every prediction (final first) and image."""
    matcher = hf.OneFormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)
    loss = hf.OneFormerLoss(num_classes=outputs["class_logits"].shape[-1] - 1, matcher=matcher, weight_dict=WEIGHTS,
                            eos_coef=0.1, num_points=num_points, oversample_ratio=3.0, importance_sample_ratio=0.75,
                            contrastive_temperature=0.07).double()
    if logit_scale is not None:
        loss.logit_scale.data.fill_(logit_scale)
    solved = []
    replay = Replay(draws)
    with monkeypatch.context() as m:
        m.setattr(torch, "rand", replay)
        real = hf.linear_sum_assignment

        def capture(cost):
            rows, cols = real(cost)
            solved.append((torch.as_tensor(np.asarray(cost)), rows.tolist(), cols.tolist()))
            return rows, cols

        m.setattr(hf, "linear_sum_assignment", capture)
        if float64_num_masks:
            m.setattr(hf.OneFormerLoss, "get_num_masks", _float64_num_masks)
        aux = [{"class_queries_logits": a["class_logits"], "masks_queries_logits": a["mask_logits"]}
               for a in outputs["aux_outputs"]]
        result = loss(outputs["mask_logits"], outputs["class_logits"], outputs["contrastive_queries"],
                      [t["masks"] for t in targets], [t["labels"] for t in targets],
                      outputs["text_queries"].float(), auxiliary_predictions=aux)
    assert replay.done()
    return result, solved, loss


def _criterion(num_points, replay, logit_scale=None):
    term = ContrastiveLoss(temperature=0.07).double()
    if logit_scale is not None:
        term.logit_scale.data.fill_(logit_scale)
    return MaskFormerCriterion(num_classes=5, num_points=num_points, matcher=HungarianMatcher(num_points=num_points),
                               uniform=replay, weights=WEIGHTS, extra_terms={"contrastive": term})


@pytest.mark.parametrize("num_points", [12544, 1000])
def test_losses_match_transformers_oneformer_loss(monkeypatch, num_points):
    outputs, targets = _case(0)
    ours_draws, hf_draws = recorded_draws(outputs, targets, num_points=num_points)
    expected, _, _ = _run_hf(outputs, targets, hf_draws, monkeypatch, num_points=num_points)
    exact, _, _ = _run_hf(outputs, targets, hf_draws, monkeypatch, num_points=num_points, float64_num_masks=True)
    replay = Replay(ours_draws)
    got = _criterion(num_points, replay)(outputs, targets)
    assert replay.done()
    assert sorted(got) == sorted(expected)
    assert len(got) == 3 * 3 + 1  # 3 terms x (final + 2 auxiliary) + the contrastive term (final only)
    for key, value in got.items():
        assert value.dtype == torch.float64, key
        if key == "loss_contrastive":  # transformers: float32 image and text queries
            assert_float32_rounding(value.float(), expected[key].reshape(()), what=key)
        elif key.startswith("loss_cross_entropy"):  # float64 in transformers too
            torch.testing.assert_close(value, expected[key].reshape(()), **F64, msg=key)
        else:  # float32 through transformers' (1,) float32 normaliser; exact with a float64 one
            assert expected[key].dtype == torch.float32, key
            assert_float32_rounding(value.float(), expected[key].reshape(()), what=key)
            torch.testing.assert_close(value, exact[key].reshape(()), **F64, msg=key)
    total = weighted_total(got, WEIGHTS)
    reference = sum(exact[k].reshape(()) * WEIGHTS[k.rstrip("_0123456789")] for k in exact if k != "loss_contrastive")
    torch.testing.assert_close(total - 0.5 * got["loss_contrastive"], reference, **F64)


def test_matcher_costs_and_assignments_of_every_prediction(monkeypatch):
    """Costs at float32 rounding of transformers' float32 mask and dice costs; assignments identical."""
    num_points = 12544
    outputs, targets = _case(3, queries=9, counts=(4, 6))
    ours_draws, hf_draws = recorded_draws(outputs, targets, num_points=num_points)
    _, solved, _ = _run_hf(outputs, targets, hf_draws, monkeypatch, num_points=num_points)
    predictions = [(outputs["class_logits"], outputs["mask_logits"])]
    predictions += [(a["class_logits"], a["mask_logits"]) for a in outputs["aux_outputs"]]
    assert len(solved) == len(predictions) * len(targets)
    points = ours_draws[0]  # (L, B, P, 2): the matching points of every prediction
    matcher = HungarianMatcher(num_points=num_points)
    mask_only = HungarianMatcher(cost_class=0, cost_mask=1, cost_dice=0, num_points=num_points)
    replay = Replay(ours_draws)
    matches = _criterion(num_points, replay).match(predictions, targets)
    for level, (cls, masks) in enumerate(predictions):
        costs = matcher.cost_matrices(cls, masks, targets, points[level])
        assert costs.dtype == torch.float64
        mask_scale = max(1.0, mask_only.cost_matrices(cls, masks, targets, points[level]).abs().max().item())
        bound = FLOAT32_ULPS * EPS32 * (5.0 * mask_scale + 5.0 * 1.0)  # dice costs lie in [0, 1]
        for b, target in enumerate(targets):
            cost, rows, cols = solved[level * len(targets) + b]
            n = len(target["labels"])
            torch.testing.assert_close(costs[b, :, :n], cost, rtol=0, atol=bound, msg=f"prediction {level} image {b}")
            q, t = matches[level][b]
            assert (q.tolist(), t.tolist()) == (rows, cols), f"prediction {level} image {b}"


@pytest.mark.parametrize("logit_scale", [None, 3.0, 5.0])  # initial log(1 / 0.07), trained, above the cap of 100
def test_contrastive_term_and_its_logit_scale(monkeypatch, logit_scale):
    outputs, targets = _case(5, batch=4, counts=(1, 2, 0, 3), levels=1)
    ours_draws, hf_draws = recorded_draws(outputs, targets, num_points=500)
    expected, _, hf_loss = _run_hf(outputs, targets, hf_draws, monkeypatch, num_points=500, logit_scale=logit_scale)
    criterion = _criterion(500, Replay(ours_draws), logit_scale)
    term = criterion.extra_terms["contrastive"]
    if logit_scale is None:  # log(1 / temperature), a float32 parameter as in the original (transformers: float64)
        assert term.logit_scale.item() == torch.tensor(math.log(1 / 0.07), dtype=torch.float32).item()
        assert term.logit_scale.item() == pytest.approx(hf_loss.logit_scale.item(), rel=EPS32)
    else:
        assert term.logit_scale.item() == hf_loss.logit_scale.item() == logit_scale
    got = criterion(outputs, targets)
    assert_float32_rounding(got["loss_contrastive"].float(), expected["loss_contrastive"].reshape(()),
                            what="loss_contrastive")
    got["loss_contrastive"].backward()
    expected["loss_contrastive"].backward()
    ours_grad, hf_grad = term.logit_scale.grad, hf_loss.logit_scale.grad
    if logit_scale == 5.0:  # exp(5) > 100: clamped, no gradient on either side
        assert ours_grad.item() == 0 and hf_grad.item() == 0
    else:
        assert ours_grad.item() != 0
        assert_float32_rounding(ours_grad.float(), hf_grad.float(), what="d loss_contrastive / d logit_scale")


def test_gradients_match_transformers_float64(monkeypatch):
    """d(weighted total) / d(class and mask logits of every prediction), with transformers' normaliser in
    float64: the backward passes agree to float64 precision."""
    num_points = 2000
    outputs, targets = _case(7)
    leaves = [outputs["class_logits"], outputs["mask_logits"]]
    leaves += [a[k] for a in outputs["aux_outputs"] for k in ("class_logits", "mask_logits")]
    for leaf in leaves:
        leaf.requires_grad_(True)
    ours_draws, hf_draws = recorded_draws(outputs, targets, num_points=num_points)
    exact, _, _ = _run_hf(outputs, targets, hf_draws, monkeypatch, num_points=num_points, float64_num_masks=True)
    theirs = torch.autograd.grad(
        sum(v.reshape(()) * WEIGHTS[k.rstrip("_0123456789")] for k, v in exact.items() if k != "loss_contrastive"),
        leaves)
    got = _criterion(num_points, Replay(ours_draws))(outputs, targets)
    got.pop("loss_contrastive")
    ours = torch.autograd.grad(weighted_total(got, WEIGHTS), leaves)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.abs().max() > 0, i
        torch.testing.assert_close(a, b, **F64, msg=f"gradient {i}")
