"""OneFormer's contrastive term on plain tensors: parity with transformers' OneFormerLoss, a float64
reference of the formula, gradients, the logit-scale cap, and plugging into the criterion."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from maskformers.training.contrastive import ContrastiveLoss, contrastive_loss
from maskformers.training.criterion import MaskFormerCriterion
from maskformers.training.matcher import HungarianMatcher
from tolerances import assert_float32_rounding

transformers = pytest.importorskip("transformers")
from transformers.models.oneformer.modeling_oneformer import OneFormerHungarianMatcher, OneFormerLoss  # noqa: E402


def _queries(seed, dtype=torch.float32, batch=4, q=6, c=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, q, c, generator=g, dtype=dtype), torch.randn(batch, q, c, generator=g, dtype=dtype))


def test_matches_transformers_oneformer_loss_float32():
    hf = OneFormerLoss(num_classes=3, matcher=OneFormerHungarianMatcher(), weight_dict={}, eos_coef=0.1,
                       num_points=10, oversample_ratio=3.0, importance_sample_ratio=0.75, contrastive_temperature=0.07)
    ours = ContrastiveLoss(temperature=0.07)
    assert ours.logit_scale.item() == pytest.approx(hf.logit_scale.item(), rel=1e-7)
    for seed in range(3):
        image, text = _queries(seed)
        expected = hf.loss_contrastive(image, text)["loss_contrastive"]
        got = ours({"contrastive_queries": image, "text_queries": text})["loss_contrastive"]
        assert_float32_rounding(got, expected.reshape(got.shape), what="loss_contrastive")


def test_float64_formula_and_gradients():
    image, text = _queries(1, torch.float64)
    image.requires_grad_(True)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    loss = contrastive_loss(image, text, scale)
    a, b = F.normalize(image.flatten(1), dim=-1), F.normalize(text.flatten(1), dim=-1)
    sim = (a @ b.T) * (1 / 0.07)
    ref = -(sim.log_softmax(1).diagonal().mean() + sim.T.log_softmax(1).diagonal().mean())
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    loss.backward()
    assert image.grad.abs().max() > 0 and scale.grad != 0
    assert torch.autograd.gradcheck(lambda x, s: contrastive_loss(x, text, s), (image.detach().requires_grad_(),
                                                                                scale.detach().requires_grad_()))


def test_logit_scale_is_capped_at_100():
    image, text = _queries(2, torch.float64)
    big = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    capped = contrastive_loss(image, text, big)
    at_cap = torch.tensor(math.log(100.0), dtype=torch.float64)
    torch.testing.assert_close(capped, contrastive_loss(image, text, at_cap))
    capped.backward()
    assert big.grad == 0  # no gradient through the clamp once capped


def test_bad_inputs_raise():
    image, text = _queries(3)
    with pytest.raises(ValueError, match="one row per image"):
        contrastive_loss(image, text[:2], torch.tensor(1.0))
    with pytest.raises(ValueError, match="same size per image"):
        contrastive_loss(image, text[:, :3], torch.tensor(1.0))
    with pytest.raises(ValueError, match="contrastive_queries and text_queries"):
        ContrastiveLoss()({"class_logits": image})
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveLoss(temperature=0)


def test_plugs_into_the_criterion_as_an_extra_term():
    g = torch.Generator().manual_seed(0)
    image, text = _queries(4, batch=2)
    outputs = {"class_logits": torch.randn(2, 6, 4, generator=g), "mask_logits": torch.randn(2, 6, 8, 8, generator=g),
               "aux_outputs": [], "contrastive_queries": image, "text_queries": text}
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 32, 32)}, {"labels": torch.tensor([0, 2]),
                                                                                "masks": torch.zeros(2, 32, 32)}]
    term = ContrastiveLoss()
    crit = MaskFormerCriterion(num_classes=3, num_points=50, matcher=HungarianMatcher(num_points=50),
                               extra_terms={"contrastive": term},
                               weights={"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0,
                                        "loss_contrastive": 0.5})
    losses = crit(outputs, targets)
    assert "loss_contrastive" in losses and "loss_contrastive_0" not in losses
    assert [n for n, _ in crit.named_parameters()] == ["extra_terms.contrastive.logit_scale"]
    crit.total(losses).backward()
    assert term.logit_scale.grad is not None and term.logit_scale.grad != 0


def test_extra_terms_take_their_share_of_an_accumulated_step():
    """With the step's target counts (the loop's gradient accumulation), a micro-batch's contrastive mean is
    weighted by its share of the step's images, so the micro-batches add up to one mean."""
    g = torch.Generator().manual_seed(1)
    image, text = _queries(5, batch=2)
    outputs = {"class_logits": torch.randn(2, 6, 4, generator=g), "mask_logits": torch.randn(2, 6, 8, 8, generator=g),
               "aux_outputs": [], "contrastive_queries": image, "text_queries": text}
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 32, 32)},
               {"labels": torch.tensor([0]), "masks": torch.ones(1, 32, 32)}]
    crit = MaskFormerCriterion(num_classes=3, num_points=50, matcher=HungarianMatcher(num_points=50),
                               extra_terms={"contrastive": ContrastiveLoss()})
    alone = crit(outputs, targets)["loss_contrastive"]
    torch.testing.assert_close(crit(outputs, targets, step_target_counts=[1, 1])["loss_contrastive"], alone)
    quarter = crit(outputs, targets, step_target_counts=[1, 1, 2, 0, 1, 1, 3, 1])["loss_contrastive"]
    torch.testing.assert_close(quarter, alone / 4)
