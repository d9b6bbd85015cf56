"""`maskformers evaluate` options and messages: --threshold, labels taken from the model and compared with the
dataset's, per-class tables and JSON, "n/a" for metrics without classes, one-line errors for a mistyped
--model folder and for a missing pycocotools."""

from __future__ import annotations

import json
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from maskformers import cli
from maskformers.models.mask2former import Mask2FormerOutput
from maskformers.training import cli_evaluate

LABELS = {0: "ground", 1: "wall"}


class YoungOracle(torch.nn.Module):
    """Finds the two regions of the test images exactly (bright = "wall") but, like a model early in training,
    gives its classes a probability of only 0.6."""

    num_classes = 2
    id2label = LABELS

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, pixel_values):
        B, _, H, W = pixel_values.shape
        bright = pixel_values[:, 0] > 0  # (B, H, W); the zero padding counts as dark, and is cropped away
        masks = torch.full((B, 4, H, W), -20.0)
        masks[:, 0] = torch.where(bright, -20.0, 20.0)
        masks[:, 1] = torch.where(bright, 20.0, -20.0)
        probs = torch.full((B, 4, 3), 1e-6)
        probs[:, :, 2] = 1.0  # queries 2, 3: no object
        probs[:, 0] = torch.tensor([0.6, 0.2, 0.2])
        probs[:, 1] = torch.tensor([0.2, 0.6, 0.2])
        return Mask2FormerOutput(class_logits=probs.log(), mask_logits=masks, aux_outputs=[],
                                 hidden_states=torch.zeros(B, 4, 1))


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """Three 30x40 images, dark left (ground) and bright right (wall) at different columns; the young oracle
    stands in for any --model."""
    for name in ("images", "labels"):
        (tmp_path / name).mkdir()
    for i, split in enumerate((10, 20, 33)):
        label = np.zeros((30, 40), np.uint8)
        label[:, split:] = 1
        PIL.Image.fromarray(np.repeat(np.where(label, 230, 20).astype(np.uint8)[..., None], 3, -1)).save(
            tmp_path / "images" / f"{i}.png")
        PIL.Image.fromarray(label).save(tmp_path / "labels" / f"{i}.png")
    monkeypatch.setattr(cli_evaluate, "load_model", lambda spec: YoungOracle())
    return tmp_path


def _evaluate(folder, *extra):
    return cli.main(["evaluate", "--model", "young", "--data", "semantic-folder", "--images", str(folder / "images"),
                     "--labels", str(folder / "labels"), "--json", str(folder / "metrics.json"), "--quiet", *extra])


def test_threshold_reaches_post_processing(folder, capsys):
    """At the fixed 0.8 every prediction of a young model is dropped (PQ 0); --threshold 0.5 keeps them."""
    assert _evaluate(folder, "--task", "panoptic") == 0
    out = capsys.readouterr()
    assert json.loads((folder / "metrics.json").read_text())["metrics"]["PQ"] == 0.0
    assert "predictions scoring under --threshold 0.8 are dropped" in out.err
    assert _evaluate(folder, "--task", "panoptic", "--threshold", "0.5") == 0
    assert "note" not in capsys.readouterr().err
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["threshold"] == 0.5 and saved["metrics"]["PQ"] == pytest.approx(100.0)
    assert _evaluate(folder, "--threshold", "1.5") == 2
    assert capsys.readouterr().err.strip() == "maskformers evaluate: --threshold must lie in [0, 1], got 1.5"


def test_labels_from_the_model_per_class_and_n_a(folder, capsys):
    """No --id2label: the model's labels are used; PQ_th of a dataset without things is n/a; --per-class prints
    a row per class and the confusion matrix, and the JSON always has both."""
    assert _evaluate(folder, "--task", "panoptic", "--task", "semantic", "--threshold", "0.5", "--per-class") == 0
    out = capsys.readouterr()
    assert "warning" not in out.err
    header, values = out.out.splitlines()[:2]
    table = dict(zip(header.split(), values.split()))
    assert table["PQ_th"] == table["SQ_th"] == "n/a" and table["PQ_st"] == "100.00" and table["mIoU"] == "100.00"
    rows = {line.split()[1]: line.split() for line in out.out.splitlines() if line.split()[:1] in (["0"], ["1"])}
    assert rows["ground"][2:5] == ["100.00"] * 3 and rows["wall"][-2:] == ["100.00", "100.00"]
    assert "confusion matrix" in out.out and out.out.endswith("     0 100.0   0.0\n     1   0.0 100.0\n")
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["id2label"] == {"0": "ground", "1": "wall"}
    wall = int(sum((np.asarray(PIL.Image.open(folder / "labels" / f"{i}.png")) == 1).sum() for i in range(3)))
    assert saved["metrics"]["confusion"] == [[3 * 30 * 40 - wall, 0], [0, wall]]
    assert saved["metrics"]["per_class"]["1"]["IoU"] == 100.0 and saved["metrics"]["PQ_th"] is None


def test_dataset_labels_are_compared_with_the_models(folder, capsys):
    (folder / "other.json").write_text(json.dumps({0: "ground", 1: "sky"}))
    assert _evaluate(folder, "--id2label", str(folder / "other.json"), "--task", "semantic") == 0
    err = capsys.readouterr().err
    assert "warning: the model's labels (2 classes) differ from the dataset's (2); e.g. id 1: model 'wall', " \
           "dataset 'sky'" in err
    (folder / "more.json").write_text(json.dumps({0: "ground", 1: "wall", 2: "sky"}))
    assert _evaluate(folder, "--id2label", str(folder / "more.json")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("maskformers evaluate: the dataset has 3 classes, the model 2: class ids [2] (sky...)")
    assert len(err.splitlines()) == 1


def test_mistyped_model_folder_says_no_such_folder(tmp_path, monkeypatch, capsys):
    """Every command's --model: a mistyped local folder is one line naming it, never a hub lookup/traceback."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("looked up on the hub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "best").mkdir(parents=True)
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    expected = "no such folder: runs/bset (runs holds the folders: best)"
    for argv in (["evaluate", "--model", "runs/bset", "--data", "synthetic", "--scenes", "1"],
                 ["train", "--model", "runs/bset", "--data", "synthetic", "--scenes", "2", "--steps", "1", "--out",
                  str(tmp_path / "out"), "--quiet"],
                 ["segment", str(tmp_path / "x.png"), "--model", "runs/bset", "--out", str(tmp_path / "seg")]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err, (argv, err)


def test_missing_pycocotools_is_one_line_naming_the_extra(folder, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # import pycocotools now raises ImportError
    assert _evaluate(folder, "--task", "instance") == 2
    assert capsys.readouterr().err.strip() == ('maskformers evaluate: mask AP (--task instance) needs pycocotools: '
                                               'pip install "maskformers[train]" (or pip install pycocotools)')
    assert cli.main(["check-data", "--data", "coco-instance", "--images", str(folder), "--annotations",
                     str(folder / "x.json")]) == 2
    assert 'pip install "maskformers[train]"' in capsys.readouterr().err
    from maskformers.evaluation.coco_ap import MaskAP

    with pytest.raises(ImportError, match=r'COCO mask AP needs pycocotools: pip install "maskformers\[train\]"'):
        MaskAP(class_ids=[0])
