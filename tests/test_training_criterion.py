"""Matcher and losses: brute force, parity with transformers' Mask2FormerLoss in float64 on the same
points, NaN-safe matching, autocast, gradients reaching every parameter."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from maskformers.training.criterion import MaskFormerCriterion, weighted_total
from maskformers.training.matcher import HungarianMatcher, solve_assignments
from maskformers.training.points import importance_sample_points
from criterion_helpers import Replay, make_case as _case, recorded_draws as _draws

transformers = pytest.importorskip("transformers")
from transformers.models.mask2former import modeling_mask2former as hf  # noqa: E402

F64 = dict(rtol=1e-12, atol=1e-12)


def _hf_loss(num_classes, num_points, **kw):
    cfg = transformers.Mask2FormerConfig(num_labels=num_classes, train_num_points=num_points, **kw)
    weights = {"loss_cross_entropy": cfg.class_weight, "loss_mask": cfg.mask_weight, "loss_dice": cfg.dice_weight}
    return hf.Mask2FormerLoss(cfg, weights).double()


def _run_hf(loss, outputs, targets, draws, monkeypatch, captured=None):
    replay = Replay(draws)
    with monkeypatch.context() as m:
        m.setattr(torch, "rand", replay)
        if captured is not None:
            real = hf.linear_sum_assignment

            def capture(cost):
                captured.append(torch.as_tensor(np.asarray(cost)))
                return real(cost)

            m.setattr(hf, "linear_sum_assignment", capture)
        aux = [{"class_queries_logits": a["class_logits"], "masks_queries_logits": a["mask_logits"]}
               for a in outputs["aux_outputs"]]
        result = loss(outputs["mask_logits"], outputs["class_logits"], [t["masks"] for t in targets],
                      [t["labels"] for t in targets], auxiliary_predictions=aux)
    assert replay.done()
    return result


@pytest.mark.parametrize("num_points", [12544, 1000])
def test_losses_match_transformers_float64(monkeypatch, num_points):
    outputs, targets = _case(0)
    ours_draws, hf_draws = _draws(outputs, targets, num_points=num_points)
    expected = _run_hf(_hf_loss(5, num_points), outputs, targets, hf_draws, monkeypatch)
    replay = Replay(ours_draws)
    criterion = MaskFormerCriterion(num_classes=5, num_points=num_points,
                                    matcher=HungarianMatcher(num_points=num_points), uniform=replay)
    got = criterion(outputs, targets)
    assert replay.done()
    assert sorted(got) == sorted(expected)
    assert len(got) == 9  # 3 terms x (final + 2 auxiliary)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key].to(got[key].dtype).reshape(()), **F64, msg=key)
    total = weighted_total(got, {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0})
    torch.testing.assert_close(total, sum(expected[k] * (2.0 if "entropy" in k else 5.0) for k in expected), **F64)


def test_matcher_costs_and_assignments_match_transformers_float64(monkeypatch):
    outputs, targets = _case(3, levels=1, queries=9, counts=(4, 0))
    P = 2000
    g = torch.Generator().manual_seed(5)
    points = torch.rand(2, P, 2, generator=g, dtype=torch.float64)
    captured = []
    matcher = hf.Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=P)
    with monkeypatch.context() as m:
        m.setattr(torch, "rand", Replay([points[0][None], points[1][None]]))
        real = hf.linear_sum_assignment
        m.setattr(hf, "linear_sum_assignment", lambda c: captured.append(torch.as_tensor(np.asarray(c))) or real(c))
        expected = matcher(outputs["mask_logits"], outputs["class_logits"], [t["masks"] for t in targets],
                           [t["labels"] for t in targets])
    ours = HungarianMatcher(num_points=P)
    costs = ours.cost_matrices(outputs["class_logits"], outputs["mask_logits"], targets, points)
    assert costs.dtype == torch.float64
    for b, t in enumerate(targets):
        n = len(t["labels"])
        torch.testing.assert_close(costs[b, :, :n], captured[b], **F64)
    got = ours(outputs["class_logits"], outputs["mask_logits"], targets, points=points)
    for (q, t), (eq, et) in zip(got, expected):
        assert q.tolist() == eq.tolist() and t.tolist() == et.tolist()
    assert got[1][0].numel() == 0


def _brute_force(cost: np.ndarray) -> tuple[int, float]:
    """(fewest non-finite entries, then the least cost) over all one-to-one assignments."""
    Q, T = cost.shape
    best = (math.inf, math.inf)
    if Q >= T:
        for rows in itertools.permutations(range(Q), T):
            vals = [cost[r, c] for c, r in enumerate(rows)]
            bad = sum(not np.isfinite(v) for v in vals)
            best = min(best, (bad, sum(v for v in vals if np.isfinite(v))))
    else:
        for cols in itertools.permutations(range(T), Q):
            vals = [cost[r, c] for r, c in enumerate(cols)]
            bad = sum(not np.isfinite(v) for v in vals)
            best = min(best, (bad, sum(v for v in vals if np.isfinite(v))))
    return best


@pytest.mark.parametrize("Q,T", [(5, 3), (6, 6), (3, 5), (4, 1), (1, 3)])
@pytest.mark.parametrize("with_bad", [False, True])
def test_assignment_is_optimal_by_brute_force(Q, T, with_bad):
    rng = np.random.default_rng(Q * 10 + T + 100 * with_bad)
    for _ in range(20):
        cost = rng.normal(size=(1, Q, T)) * 3
        if with_bad:
            cost[0][rng.random((Q, T)) < 0.3] = rng.choice([np.nan, np.inf, -np.inf])
        (rows, cols), = solve_assignments(cost, [T])
        assert len(rows) == min(Q, T) and len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        vals = cost[0][rows.numpy(), cols.numpy()]
        got = (int((~np.isfinite(vals)).sum()), float(vals[np.isfinite(vals)].sum()))
        want = _brute_force(cost[0])
        assert got[0] == want[0]
        assert got[1] == pytest.approx(want[1], rel=1e-12, abs=1e-12)


def test_matcher_survives_nonfinite_predictions():
    outputs, targets = _case(4, levels=1)
    cls, masks = outputs["class_logits"].clone(), outputs["mask_logits"].clone()
    masks[0, 2] = float("nan")
    cls[1, 0] = float("inf")
    got = HungarianMatcher(num_points=500)(cls, masks, targets)
    assert 2 not in got[0][0].tolist()  # a NaN query is avoided while a finite one is free
    assert [len(q) for q, _ in got] == [3, 5]


def test_importance_sampling_picks_the_most_uncertain_candidates():
    logits = torch.linspace(-5, 5, 64, dtype=torch.float64).view(1, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    cand = torch.rand(1, 30, 2, generator=g, dtype=torch.float64)
    extra = torch.rand(1, 5, 2, generator=g, dtype=torch.float64)
    points = importance_sample_points(logits, num_points=20, oversample_ratio=1.5, importance_sample_ratio=0.75,
                                      uniform=Replay([cand, extra]))
    assert points.shape == (1, 20, 2)
    assert torch.equal(points[0, 15:], extra[0])
    from maskformers.training.points import point_sample
    values = point_sample(logits, cand)[0, 0].abs()
    chosen = set(values.argsort()[:15].tolist())
    picked = {int((cand[0] == p).all(-1).nonzero()) for p in points[0, :15]}
    assert picked == chosen


def test_empty_targets_give_zero_mask_losses_and_no_object_everywhere():
    outputs, targets = _case(5, counts=(0, 0))
    crit = MaskFormerCriterion(num_classes=5, num_points=100, matcher=HungarianMatcher(num_points=100))
    losses = crit(outputs, targets)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice_1"].item() == 0
    target = torch.full((2, 7), 5)
    ce = torch.nn.functional.cross_entropy(outputs["class_logits"].transpose(1, 2), target)
    torch.testing.assert_close(losses["loss_cross_entropy"], ce, **F64)


def test_bad_targets_raise():
    outputs, targets = _case(6)
    crit = MaskFormerCriterion(num_classes=5, num_points=100, matcher=HungarianMatcher(num_points=100))
    bad = [dict(targets[0]), targets[1]]
    bad[0]["labels"] = torch.tensor([0, 1, 5])
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 4\]"):
        crit(outputs, bad)
    with pytest.raises(ValueError, match="expected 2 targets"):
        crit(outputs, targets[:1])
    bad = [{"labels": targets[0]["labels"], "masks": targets[0]["masks"][:2]}, targets[1]]
    with pytest.raises(ValueError, match=r"targets\[0\]: expected masks \(N, H, W\) for N=3"):
        crit(outputs, bad)


def test_bfloat16_autocast_matches_in_float32():
    outputs, targets = _case(7)
    half = {"class_logits": outputs["class_logits"].bfloat16(), "mask_logits": outputs["mask_logits"].bfloat16(),
            "aux_outputs": []}
    points = torch.rand(2, 300, 2)
    m = HungarianMatcher(num_points=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        costs = m.cost_matrices(half["class_logits"], half["mask_logits"], targets, points)
    assert costs.dtype == torch.float32
    ref = m.cost_matrices(half["class_logits"].float(), half["mask_logits"].float(), targets, points)
    torch.testing.assert_close(costs, ref, rtol=0, atol=0)
    crit = MaskFormerCriterion(num_classes=5, num_points=300, matcher=m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = crit(half, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_gradients_reach_every_parameter():
    from maskformers.models.mask2former import Mask2FormerConfig, build_mask2former

    torch.manual_seed(0)
    cfg = Mask2FormerConfig(
        backbone={"name": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2],
                  "window_size": 4},
        num_classes=3, num_queries=6, hidden_dim=32, conv_dim=32, mask_dim=32, num_heads=2, encoder_layers=1,
        encoder_ffn_dim=32, decoder_layers=3, decoder_ffn_dim=32,
    )
    model = build_mask2former(cfg)
    x = torch.randn(2, 3, 64, 64)
    g = torch.Generator().manual_seed(0)
    targets = [{"labels": torch.tensor([0, 2]), "masks": torch.rand(2, 64, 64, generator=g) > 0.5},
               {"labels": torch.tensor([1]), "masks": torch.rand(1, 64, 64, generator=g) > 0.3}]
    crit = MaskFormerCriterion(num_classes=3, num_points=200, matcher=HungarianMatcher(num_points=200))
    losses = crit(model(x), targets)
    assert len(losses) == 3 * 4
    crit.total(losses).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no (finite) gradient for {missing}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().max() == 0]
    # the deformable layers start with zero offset and attention-weight projections (the original init), so
    # the position/level embedding added to their queries cannot move anything until those have trained
    assert zero == ["pixel_decoder.level_embed"], f"zero gradient for {zero}"
    with torch.no_grad():
        for layer in model.pixel_decoder.encoder.layers:
            layer.self_attn.sampling_offsets.weight.normal_(0, 0.01)
    model.zero_grad()
    crit.total(crit(model(x), targets)).backward()
    assert model.pixel_decoder.level_embed.grad.abs().max() > 0


def test_keyed_points_make_each_image_independent_of_its_batch():
    """With image keys, an image's matched-mask losses do not depend on the other images of the batch
    (what makes N processes equal to one): loss * num_masks adds up over sub-batches."""
    outputs, targets = _case(8, batch=3, counts=(2, 4, 3))
    crit = MaskFormerCriterion(num_classes=5, num_points=300, matcher=HungarianMatcher(num_points=300))
    keys = [11, 22, 33]
    whole = crit(outputs, targets, image_keys=keys)

    def part(i):
        sub = {"class_logits": outputs["class_logits"][i:i + 1], "mask_logits": outputs["mask_logits"][i:i + 1],
               "aux_outputs": [{k: v[i:i + 1] for k, v in a.items()} for a in outputs["aux_outputs"]]}
        return crit(sub, targets[i:i + 1], image_keys=keys[i:i + 1])

    parts = [part(i) for i in range(3)]
    counts = [len(t["labels"]) for t in targets]
    for key in whole:
        if key.startswith(("loss_mask", "loss_dice")):
            torch.testing.assert_close(whole[key] * sum(counts), sum(p[key] * n for p, n in zip(parts, counts)),
                                       rtol=1e-12, atol=1e-12, msg=key)
    again = crit(outputs, targets, image_keys=keys)
    assert all(torch.equal(again[k], whole[k]) for k in whole)
    other = crit(outputs, targets, image_keys=[1, 2, 3])
    assert not torch.equal(other["loss_mask"], whole["loss_mask"])
    with pytest.raises(ValueError, match="one image key per image"):
        crit(outputs, targets, image_keys=[1])


@pytest.mark.parametrize("keyed", [False, True])
def test_host_waits_do_not_grow_with_the_batch(keyed):
    """On a GPU the loss may wait for the device only for the cost matrices (scipy solves them on the host)
    and the label check, once per batch: no value read, value-sized op or copy per image or per level.
    HostSyncCounter counts them on the CPU (see host_sync_helpers)."""
    from host_sync_helpers import HostSyncCounter

    events = []
    for batch in (1, 4):
        outputs, targets = _case(7, batch=batch, counts=(3, 5, 0, 2)[:batch], levels=3)
        criterion = MaskFormerCriterion(num_classes=5, num_points=500, matcher=HungarianMatcher(num_points=500))
        with HostSyncCounter() as counter:
            criterion(outputs, targets, image_keys=list(range(batch)) if keyed else None)
        events.append(dict(counter.events))
    assert events[0] == events[1], f"batch 1: {events[0]}, batch 4: {events[1]}"
    assert sum(events[1].values()) <= 3, events[1]
