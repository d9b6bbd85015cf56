"""Metrics on hand-made cases whose values are worked out by hand (PQ per panopticapi's definition,
mIoU per detectron2/mmseg, mask AP per COCOeval), and a model evaluated end to end."""

from __future__ import annotations

import pytest
import torch

from maskformers.evaluation.panoptic_quality import PanopticQuality
from maskformers.evaluation.semantic_iou import SemanticIoU


def _row(*runs):
    """A (1, W) map from (value, length) runs."""
    return torch.tensor([v for v, n in runs for _ in range(n)]).view(1, -1)


def test_panoptic_quality_hand_made():
    pq = PanopticQuality(num_classes=2, thing_ids=[0])
    # image 1: a thing matched with IoU 6/8; stuff matched with IoU 10/12 (2 of its pixels on void don't count)
    gt = _row((1, 8), (2, 10), (0, 2))
    pred = _row((5, 6), (6, 14))
    pq.update(pred, [{"id": 5, "category_id": 0}, {"id": 6, "label_id": 1}], gt,
              [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 1}])
    out = pq.compute()
    assert out["PQ"] == pytest.approx((0.75 + 10 / 12) / 2 * 100)
    assert out["SQ"] == pytest.approx(out["PQ"]) and out["RQ"] == pytest.approx(100)
    # image 2: a prediction on a crowd region of its class and one on void are ignored; a poor match
    # (IoU 2/5) is a false positive plus a false negative
    gt = _row((1, 10), (2, 5), (0, 5))
    pred = _row((3, 8), (0, 2), (4, 2), (0, 3), (7, 5))
    pq.update(pred, [{"id": 3, "category_id": 0}, {"id": 4, "category_id": 0}, {"id": 7, "category_id": 1}], gt,
              [{"id": 1, "category_id": 0, "iscrowd": 1}, {"id": 2, "category_id": 0}])
    out = pq.compute()
    assert pq.tp.tolist() == [1, 1] and pq.fp.tolist() == [1, 0] and pq.fn.tolist() == [1, 0]
    assert out["PQ_th"] == pytest.approx(0.75 / 2 * 100) and out["RQ_th"] == pytest.approx(50)
    assert out["SQ_th"] == pytest.approx(75)
    assert out["PQ_st"] == pytest.approx(10 / 12 * 100)
    assert out["PQ"] == pytest.approx((0.375 + 10 / 12) / 2 * 100)
    assert out["n"] == 2 and out["n_th"] == 1 and out["n_st"] == 1
    assert out["per_class"] == {0: pytest.approx({"PQ": 37.5, "SQ": 75.0, "RQ": 50.0, "TP": 1, "FP": 1, "FN": 1}),
                                1: pytest.approx({"PQ": 1000 / 12, "SQ": 1000 / 12, "RQ": 100.0, "TP": 1, "FP": 0,
                                                  "FN": 0})}


def test_metrics_without_classes_are_none_not_zero():
    """PQ_th of a dataset without thing classes, mIoU without a pixel, AP without ground truth: None ("n/a"),
    never a 0.0 or COCOeval's -1 that reads like a score."""
    pq = PanopticQuality(num_classes=2, thing_ids=[])
    pq.update(_row((1, 4)), [{"id": 1, "category_id": 1}], _row((1, 4)), [{"id": 1, "category_id": 1}])
    out = pq.compute()
    assert out["PQ_st"] == 100.0 and out["PQ_th"] is None and out["SQ_th"] is None and out["n_th"] == 0
    empty = SemanticIoU(num_classes=2).compute()
    assert empty["mIoU"] is None and empty["pACC"] is None and empty["mACC"] is None
    from maskformers.evaluation.evaluate import format_table

    assert format_table({"PQ": 100.0, "PQ_th": None}).splitlines()[1].split() == ["100.00", "n/a"]


def test_panoptic_quality_match_needs_iou_above_half_and_same_class():
    pq = PanopticQuality(num_classes=3, thing_ids=[0, 1])
    gt = _row((1, 10))
    pq.update(_row((2, 5), (3, 5)), [{"id": 2, "category_id": 0}, {"id": 3, "category_id": 0}], gt,
              [{"id": 1, "category_id": 0}])  # IoU exactly 0.5: no match
    assert pq.tp.tolist() == [0, 0, 0] and pq.fp[0] == 2 and pq.fn[0] == 1
    pq.update(_row((2, 10)), [{"id": 2, "category_id": 1}], gt, [{"id": 1, "category_id": 0}])
    assert pq.fp[1] == 1 and pq.fn[0] == 2
    out = pq.compute()
    assert out["n"] == 2 and out["PQ"] == 0.0


def test_panoptic_quality_bad_inputs():
    pq = PanopticQuality(num_classes=2, thing_ids=[0])
    with pytest.raises(ValueError, match="differ in size"):
        pq.update(torch.zeros(2, 3), [], torch.zeros(3, 2), [])
    with pytest.raises(ValueError, match=r"segment ids \[4\] missing"):
        pq.update(torch.full((2, 2), 4), [], torch.zeros(2, 2), [])
    with pytest.raises(ValueError, match="classes in 0..1"):
        pq.update(torch.ones(2, 2), [{"id": 1, "category_id": 5}], torch.zeros(2, 2), [])


def test_semantic_iou_hand_made():
    m = SemanticIoU(num_classes=3, ignore_index=255)
    m.update(torch.tensor([0, 1, 1, 1, 2, 2]), torch.tensor([0, 0, 1, 1, 255, 1]))
    out = m.compute()
    # class 0: 1 / 2; class 1: 2 / 4; class 2: predicted once where the truth is 1 -> IoU 0, still counted
    assert {c: r["IoU"] for c, r in out["per_class"].items()} == pytest.approx({0: 50.0, 1: 50.0, 2: 0.0})
    assert out["per_class"][0]["ACC"] == 50.0 and out["per_class"][2]["ACC"] is None  # 2 is never in the truth
    assert out["confusion"].tolist() == [[1, 1, 0], [0, 2, 1], [0, 0, 0]]  # rows: ground truth
    assert out["mIoU"] == pytest.approx(100 / 3)
    assert out["pACC"] == pytest.approx(60.0)
    m2 = SemanticIoU(num_classes=3)
    m2.update(torch.tensor([0, 0]), torch.tensor([0, 255]))
    assert m2.compute()["mIoU"] == 100.0  # classes absent from both are left out
    with pytest.raises(ValueError, match="outside 0..2"):
        m2.update(torch.tensor([3]), torch.tensor([0]))


def test_mask_ap_hand_made():
    pytest.importorskip("pycocotools")
    from maskformers.evaluation.coco_ap import MaskAP

    gt = torch.zeros(1, 20, 20, dtype=torch.bool)
    gt[0, :10, :10] = True
    perfect = MaskAP(class_ids=[0, 1])
    perfect.update(gt, torch.tensor([0]), torch.tensor([0.9]), gt, torch.tensor([0]))
    assert perfect.compute()["AP"] == pytest.approx(100.0)
    partial = MaskAP(class_ids=[0, 1])
    pred = torch.zeros_like(gt)
    pred[0, :6, :10] = True
    pred[0, 6, :2] = True  # 62 of the 100 pixels: IoU 0.62
    partial.update(pred, torch.tensor([0]), torch.tensor([0.9]), gt, torch.tensor([0]))
    out = partial.compute()
    assert out["AP50"] == pytest.approx(100.0) and out["AP75"] == pytest.approx(0.0)
    assert out["AP"] == pytest.approx(30.0)  # matched at IoU thresholds 0.50, 0.55, 0.60 of ten
    assert out["APs"] == pytest.approx(30.0) and out["APl"] is None  # no large objects: n/a, not -1
    assert out["per_class"] == {0: {"AP": pytest.approx(30.0)}, 1: {"AP": None}}
    wrong_class = MaskAP(class_ids=[0, 1])
    wrong_class.update(gt, torch.tensor([1]), torch.tensor([0.9]), gt, torch.tensor([0]))
    out = wrong_class.compute()
    assert out["AP"] == 0.0 and out["per_class"] == {0: {"AP": 0.0}, 1: {"AP": None}}
    nothing = MaskAP(class_ids=[0, 1])
    nothing.update(gt[:0], torch.tensor([], dtype=torch.int64), torch.tensor([]), gt, torch.tensor([0]))
    out = nothing.compute()  # ground truth but no prediction: 0 where there is an object, None elsewhere
    assert out["AP"] == 0.0 and out["APs"] == 0.0 and out["APm"] is None and out["per_class"][1] == {"AP": None}
    assert MaskAP(class_ids=[0]).compute()["AP"] is None  # no ground truth at all


# evaluate_model preprocesses by the model's settings: the oracles' keep the 64x64 scenes at their size
IDENTITY_RESIZE = {"size": {"max_height": 64, "max_width": 64}, "size_divisor": 0}


def _oracle_logits(segments_per_image, shape, *, queries=12, num_classes=8):
    """class (B, Q, K+1) and full-resolution mask (B, Q, H, W) logits that reproduce the given segments
    ``[[(label, mask (h, w)), ...] per image]``: each segment one confident query, the rest "no object"."""
    B, _, H, W = shape
    cls = torch.full((B, queries, num_classes + 1), -20.0)
    cls[:, :, num_classes] = 20.0
    masks = torch.full((B, queries, H, W), -20.0)  # full resolution: post-processing's resize is the identity
    for b, segments in enumerate(segments_per_image):
        for q, (label, m) in enumerate(segments):
            cls[b, q, num_classes], cls[b, q, label] = -20.0, 20.0
            masks[b, q, : m.shape[0], : m.shape[1]] = torch.where(m, 20.0, -20.0)
    return cls, masks


def test_evaluate_model_end_to_end_on_a_perfect_oracle():
    """A fake model whose logits reproduce the ground truth must score 100 on every metric."""
    pytest.importorskip("pycocotools")
    from maskformers.evaluation.evaluate import evaluate_model
    from maskformers.models.mask2former import Mask2FormerOutput
    from maskformers.training.synthetic import SyntheticScenes

    scenes = SyntheticScenes(3, size=64, seed=5)

    class Oracle(torch.nn.Module):
        num_classes = 8
        preprocessor_config = IDENTITY_RESIZE  # the oracle answers at the image's own size

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.i = 0

        def forward(self, pixel_values):
            segments = []
            for _ in range(len(pixel_values)):
                s = scenes[self.i]
                self.i += 1
                segments.append(list(zip(s["labels"].tolist(), s["masks"])))
            cls, masks = _oracle_logits(segments, pixel_values.shape)
            return Mask2FormerOutput(class_logits=cls, mask_logits=masks, aux_outputs=[],
                                     hidden_states=torch.zeros(len(cls), cls.shape[1], 1))

    model = Oracle()
    metrics = evaluate_model(model, scenes, tasks=["panoptic", "semantic", "instance"], batch_size=2, per_class=True)
    for name in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU", "pACC", "AP", "AP50", "AP75"):
        assert metrics[name] == pytest.approx(100.0), name
    present = {c for i in range(3) for c in scenes[i]["labels"].tolist()}
    assert sorted(metrics["per_class"]) == list(range(8)) and len(present) < 8
    for c, row in metrics["per_class"].items():  # every class present scored 100; AP for the thing classes only
        keys = ("PQ", "SQ", "RQ", "IoU", "ACC") + (("AP",) if c in scenes.thing_ids else ())
        assert all(row[k] == pytest.approx(100.0) if c in present else row[k] is None for k in keys), (c, row)
        assert row["FP"] == row["FN"] == (0 if c in present else None)
        assert c in scenes.thing_ids or row["AP"] is None  # stuff: no AP
    confusion = torch.tensor(metrics["confusion"])
    assert confusion.shape == (8, 8) and confusion.sum() > 0 and torch.equal(confusion, confusion.diag().diag())


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from oneformer_helpers import clip_tokenizer_folder

    return clip_tokenizer_folder(tmp_path_factory.mktemp("clip"))


def test_evaluate_oneformer_on_an_oracle(clip_folder, monkeypatch):
    """A OneFormer runs once per metric with that metric's task prompt, through OneFormer's post-processing:
    an oracle answering each prompt with that task's ground truth (stuff split in two queries of one class,
    which OneFormer's panoptic inference fuses) scores 100 everywhere."""
    pytest.importorskip("pycocotools")
    from types import SimpleNamespace

    from maskformers.evaluation import evaluate as evaluate_module
    from maskformers.models.oneformer import OneFormerOutput
    from maskformers.processing.class_info import ClassInfo
    from maskformers.processing.clip_tokenizer import CLIPTokenizer
    from maskformers.training.oneformer_data import oneformer_targets
    from maskformers.training.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_THING_IDS, SyntheticScenes

    scenes = SyntheticScenes(3, size=64, seed=5)
    info = ClassInfo(names=SYNTHETIC_CLASSES, thing_ids=SYNTHETIC_THING_IDS)
    tokenizer = CLIPTokenizer.from_pretrained(clip_folder)
    prompts = {task: tokenizer(f"The task is {task}")[0] for task in ("panoptic", "semantic", "instance")}

    class OneFormerOracle(torch.nn.Module):
        num_classes = 8
        preprocessor_config = IDENTITY_RESIZE

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.task_encoder = SimpleNamespace(task_seq_len=77)
            self.i, self.asked = 0, []

        def forward(self, pixel_values, task_inputs):
            tasks = [next(t for t, ids in prompts.items() if torch.equal(ids, row)) for row in task_inputs]
            assert len(set(tasks)) == 1
            self.asked.append(tasks[0])
            segments = []
            for b in range(len(pixel_values)):
                s = scenes[self.i + b]
                target, _ = oneformer_targets(s, tasks[0], info)
                image = []
                for label, mask in zip(target["labels"].tolist(), target["masks"]):
                    if tasks[0] == "panoptic" and label not in SYNTHETIC_THING_IDS:  # two halves of one stuff region
                        left = torch.zeros_like(mask)
                        left[:, :32] = True
                        image += [(label, mask & left), (label, mask & ~left)]
                    else:
                        image.append((label, mask))
                segments.append(image)
            if tasks[0] == "instance":  # the last task of a batch
                self.i += len(pixel_values)
            cls, masks = _oracle_logits(segments, pixel_values.shape)
            return OneFormerOutput(class_logits=cls, mask_logits=masks, aux_outputs=[],
                                   hidden_states=torch.zeros(len(cls), cls.shape[1], 1),
                                   task_token=torch.zeros(len(cls), 1), contrastive_queries=torch.zeros(len(cls), 1))

    rules = []
    for name in ("post_process_panoptic", "post_process_semantic", "post_process_instance"):
        real = getattr(evaluate_module, name)
        monkeypatch.setattr(evaluate_module, name,
                            lambda *a, _real=real, **k: rules.append(k.get("model")) or _real(*a, **k))
    model = OneFormerOracle()
    metrics = evaluate_module.evaluate_model(model, scenes, tasks=["panoptic", "semantic", "instance"], batch_size=2,
                                             tokenizer=tokenizer)
    assert model.asked == ["panoptic", "semantic", "instance"] * 2  # one pass per metric and batch
    assert set(rules) == {"oneformer"}
    for name in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU", "pACC", "AP", "AP50", "AP75"):
        assert metrics[name] == pytest.approx(100.0), name

    model = OneFormerOracle()  # the tokenizer of the folder the model was loaded from
    model.source_folder = clip_folder
    again = evaluate_module.evaluate_model(model, scenes, task="panoptic", batch_size=3)
    assert again["PQ"] == pytest.approx(100.0) and model.asked == ["panoptic"]
    model.source_folder = clip_folder.parent
    with pytest.raises(ValueError, match="needs its CLIP tokenizer"):
        evaluate_module.evaluate_model(model, scenes, task="panoptic")
