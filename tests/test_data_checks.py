"""Datasets that would train a silently wrong model are refused, naming the file: colour masks without a palette,
palettes (mmsegmentation / id2color style), binary 0/255 masks, malformed COCO polygons; and ``maskformers
check-data``, which reads every sample once and reports every problem at once."""

from __future__ import annotations

import json
import re

import numpy as np
import PIL.Image
import pytest
import torch

from maskformers import cli
from maskformers.training.data import SampleError, TrainingDataset
from maskformers.training.readers_coco import CocoInstances
from maskformers.training.readers_semantic import HFSegmentationDataset, SemanticFolder

NAMES = {0: "background", 1: "road", 2: "car"}
RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)


def _folder(tmp_path, labels, *, mode="RGB"):
    """images/NAME.png (grey) + labels/NAME.png, one per entry of ``labels`` (uint8 arrays)."""
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "labels").mkdir(exist_ok=True)
    for name, label in labels.items():
        PIL.Image.fromarray(np.full((*label.shape[:2], 3), 90, np.uint8)).save(tmp_path / "images" / f"{name}.png")
        PIL.Image.fromarray(label.astype(np.uint8)).convert(mode).save(tmp_path / "labels" / f"{name}.png")
    return tmp_path / "images", tmp_path / "labels"


def _colour_mask():
    """(6, 8, 3): red road on top, a green car bottom right, blue (background) elsewhere; and its class ids."""
    ids = np.zeros((6, 8), np.int64)
    ids[:2] = 1
    ids[4:, 5:] = 2
    rgb = np.zeros((6, 8, 3), np.uint8)
    for c, colour in ((0, BLUE), (1, RED), (2, GREEN)):
        rgb[ids == c] = colour
    return rgb, ids


# ---------------------------------------------------------------------------------------------- colour masks
def test_colour_mask_without_palette_is_refused_naming_file_and_colours(tmp_path):
    rgb, _ = _colour_mask()
    images, labels = _folder(tmp_path, {"street": rgb})
    reader = SemanticFolder(images, labels, id2label=NAMES)
    with pytest.raises(SampleError, match=r"street\.png: a colour mask .*colours: \(30, 30, 200\) 26 px, "
                                          r"\(200, 30, 30\) 16 px, \(30, 200, 30\) 6 px.*--palette FILE"):
        reader[0]
    skipped = TrainingDataset(reader, task="semantic", on_error="skip")[0]  # a bad sample: skippable, named
    assert skipped[0] is None and "street.png" in skipped[1]


def test_palette_maps_colours_to_ids(tmp_path):
    rgb, ids = _colour_mask()
    images, labels = _folder(tmp_path, {"street": rgb})
    palette = tmp_path / "palette.json"
    palette.write_text(json.dumps({"0": list(BLUE), "1": "#c81e1e", "2": list(GREEN)}))
    sample = SemanticFolder(images, labels, id2label=NAMES, palette=palette)[0]
    assert sample["labels"].tolist() == [0, 1, 2]
    for k, c in enumerate([0, 1, 2]):
        assert torch.equal(sample["masks"][k], torch.from_numpy(ids == c))
    # mmsegmentation's list form, id = position; a colour may map to ignore_index
    listed = SemanticFolder(images, labels, id2label=NAMES, palette=[list(BLUE), list(RED), list(GREEN)])[0]
    assert torch.equal(listed["masks"], sample["masks"])
    ignored = SemanticFolder(images, labels, id2label=NAMES, palette={255: list(BLUE), 1: list(RED), 2: list(GREEN)})
    assert ignored[0]["labels"].tolist() == [1, 2] and int(ignored[0]["masks"].sum()) == 22
    # a colour the palette does not list: named with the file
    with pytest.raises(SampleError, match=r"street\.png: colour\(s\) not in the palette: \(30, 200, 30\) 6 px"):
        SemanticFolder(images, labels, id2label=NAMES, palette={0: list(BLUE), 1: list(RED)})[0]
    # HF rows take the same palette
    rows = [{"image": PIL.Image.open(images / "street.png"), "annotation": PIL.Image.fromarray(rgb)}]
    hf = HFSegmentationDataset(rows, id2label=NAMES, palette={"id2color": {"0": BLUE, "1": RED, "2": GREEN}})[0]
    assert torch.equal(hf["masks"], sample["masks"])


def test_palette_files_are_checked(tmp_path):
    from maskformers.training.label_maps import load_palette

    with pytest.raises(ValueError, match=r"colour \[1, 2, 3\] is given to ids 0 and 1"):
        load_palette({0: [1, 2, 3], 1: [1, 2, 3]})
    with pytest.raises(ValueError, match=r"palette, id 4: expected a colour \[r, g, b\] of ints 0..255"):
        load_palette({4: [1, 2, 300]})
    with pytest.raises(ValueError, match=r"palette ids \[7\] are neither in id2label \(0..2\) nor ignore_index 255"):
        SemanticFolder(tmp_path, tmp_path, id2label=NAMES, palette={7: [1, 2, 3]})
    with pytest.raises(ValueError, match="cannot be combined with reduce_labels"):
        SemanticFolder(tmp_path, tmp_path, id2label=NAMES, palette={0: [1, 2, 3]}, reduce_labels=True)


def test_index_masks_still_read_as_ids(tmp_path):
    """Grey RGB files (channels agree) and P-mode PNGs give their values / palette indices as ids."""
    _, ids = _colour_mask()
    images, labels = _folder(tmp_path, {"grey": np.repeat(ids[..., None], 3, -1)})
    assert SemanticFolder(images, labels, id2label=NAMES)[0]["labels"].tolist() == [0, 1, 2]
    p_mode = PIL.Image.fromarray(ids.astype(np.uint8), mode="L").convert("P")
    p_mode.putpalette([v for c in (BLUE, RED, GREEN) for v in c])
    p_mode.save(labels / "grey.png")
    sample = SemanticFolder(images, labels, id2label=NAMES)[0]
    assert sample["labels"].tolist() == [0, 1, 2] and torch.equal(sample["masks"][2], torch.from_numpy(ids == 2))
    # with a palette the same P-mode file is read through its colour table
    mapped = SemanticFolder(images, labels, id2label=NAMES, palette={0: BLUE, 1: RED, 2: GREEN})[0]
    assert torch.equal(mapped["masks"], sample["masks"])


# ---------------------------------------------------------------------------------------------- binary masks
def _binary(n):
    out = {}
    for i in range(n):
        m = np.zeros((6, 8), np.uint8)
        m[i % 4:, 2:5] = 255
        out[f"m{i}"] = m
    return out


def test_binary_0_255_masks_are_refused_when_the_reader_opens(tmp_path):
    images, labels = _folder(tmp_path, _binary(5), mode="L")
    with pytest.raises(ValueError, match=r"labels: the label maps hold only 0 \(bg\) and 255 \(ignore_index\) in all 5 "
                                         r"checked, e.g. .*m0\.png: .*class 1 \(object\) never learned; binary masks "
                                         r"saved as 0/255\? map 255 to class 1 with a palette"):
        SemanticFolder(images, labels, id2label={0: "bg", 1: "object"})
    # the hint works: a palette of grey colours maps them
    sample = SemanticFolder(images, labels, id2label={0: "bg", 1: "object"},
                            palette={0: [0, 0, 0], 1: [255, 255, 255]})[0]
    assert sample["labels"].tolist() == [0, 1] and int(sample["masks"][1].sum()) == 18
    rows = [{"image": np.zeros((6, 8, 3), np.uint8), "annotation": m} for m in _binary(3).values()]
    with pytest.raises(ValueError, match=r"column 'annotation': the label maps hold only 0"):
        HFSegmentationDataset(rows, id2label={0: "bg", 1: "object"})
    # one map with another class is enough to show the data is not binary
    (labels / "m2.png").unlink()
    PIL.Image.fromarray(np.ones((6, 8), np.uint8)).save(labels / "m2.png")
    assert len(SemanticFolder(images, labels, id2label={0: "bg", 1: "object"})) == 5


# ---------------------------------------------------------------------------------------------- COCO polygons
@pytest.mark.parametrize("segmentation, message", [
    ([], "empty polygon list"),
    ([[]], "at least three points, got \\[\\]"),
    ([[1, 2, 3, 4]], "at least three points, got \\[1, 2, 3, 4\\]"),
])
def test_malformed_coco_polygons_are_sample_errors(tmp_path, segmentation, message):
    pytest.importorskip("pycocotools")
    (tmp_path / "images").mkdir()
    PIL.Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "images" / "x.png")
    data = {"images": [{"id": 7, "file_name": "x.png", "height": 10, "width": 12}],
            "annotations": [{"id": 41, "image_id": 7, "category_id": 3, "iscrowd": 0, "segmentation": segmentation}],
            "categories": [{"id": 3, "name": "cat"}]}
    (tmp_path / "inst.json").write_text(json.dumps(data))
    reader = CocoInstances(tmp_path / "images", tmp_path / "inst.json")
    with pytest.raises(SampleError, match=rf"x\.png: bad segmentation in annotation 41 of .*inst\.json: .*{message}"):
        reader[0]
    assert TrainingDataset(reader, task="instance", on_error="skip")[0][0] is None


# ---------------------------------------------------------------------------------------------- check-data
def test_check_data_reports_every_problem_at_once(tmp_path, capsys):
    rgb, ids = _colour_mask()
    images, labels = _folder(tmp_path, {"a_good": ids, "b_colour": rgb, "c_small": ids, "d_unknown": ids + 3,
                                        "e_empty": np.full((6, 8), 255)}, mode="L")
    PIL.Image.fromarray(rgb).save(labels / "b_colour.png")
    PIL.Image.fromarray(ids[:5].astype(np.uint8)).save(labels / "c_small.png")
    PIL.Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(images / "f_nolabel.png")
    PIL.Image.fromarray(ids.astype(np.uint8)).save(labels / "g_orphan.png")
    (tmp_path / "id2label.json").write_text(json.dumps({**NAMES, 3: "sky"}))
    out = tmp_path / "overlays"
    rc = cli.main(["check-data", "--data", "semantic-folder", "--images", str(images), "--labels", str(labels),
                   "--id2label", str(tmp_path / "id2label.json"), "--overlay-dir", str(out), "--overlays", "2",
                   "--json", str(tmp_path / "report.json"), "--quiet"])
    assert rc == 1
    text = capsys.readouterr().out
    problems = [line for line in text.splitlines() if line.startswith("  problem: ")]
    assert len(problems) == 5, text
    for expected in (r"f_nolabel\.png: no label file", r"b_colour\.png: a colour mask .*\(200, 30, 30\) 16 px",
                     r"c_small\.png: annotation size \(5, 8\) does not match the image size \(6, 8\)",
                     r"d_unknown\.png: unknown class id\(s\) \[4, 5\]", r"e_empty\.png: nothing labelled"):
            assert any(re.search(expected, p) for p in problems), expected
    assert "read 2 of 5 samples; 5 problems" in text and "g_orphan.png" in text
    # class counts over the readable samples: a_good, and e_empty (nothing labelled)
    table = {line.split()[1]: line.split() for line in text.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"],
                                                                                                  ["3"])}
    assert table["road"][2:4] == ["1", "1"] and table["car"][2:4] == ["1", "1"] and table["sky"][2] == "0"
    assert "1 class(es) never appear: 3 (sky)" in text
    report = json.loads((tmp_path / "report.json").read_text())["train"]
    assert report["classes"]["1"]["pixels"] == int((ids == 1).sum()) and report["void_pixels"] == 48
    written = sorted(p.name for p in out.iterdir())
    assert written == ["00000_a_good.png", "00004_e_empty.png"]
    good, empty = (np.asarray(PIL.Image.open(out / name).convert("RGB"))[:6, :8].astype(int) for name in written)
    assert (good != 90).any(-1).mean() > 0.5  # a_good is labelled everywhere: painted (tags drawn over a few)
    assert (empty == 90).all()  # nothing labelled: the image as it is

    # the same data cleaned: exit 0
    for name in ("b_colour", "c_small", "d_unknown", "e_empty", "f_nolabel"):
        for folder in (images, labels):
            (folder / f"{name}.png").unlink(missing_ok=True)
    rc = cli.main(["check-data", "--data", "semantic-folder", "--images", str(images), "--labels", str(labels),
                   "--id2label", str(tmp_path / "id2label.json"), "--overlays", "0", "--quiet"])
    assert rc == 0 and "no problems" in capsys.readouterr().out


def test_check_data_finds_binary_masks_and_bad_options(tmp_path, capsys):
    images, labels = _folder(tmp_path, _binary(3), mode="L")
    (tmp_path / "id2label.json").write_text(json.dumps({0: "bg", 1: "object"}))
    args = ["check-data", "--data", "semantic-folder", "--images", str(images), "--labels", str(labels),
            "--id2label", str(tmp_path / "id2label.json"), "--overlays", "0", "--quiet"]
    assert cli.main(args) == 1
    assert "every label map holds only class 0 (bg) and ignored pixels (3 of 3" in capsys.readouterr().out
    assert cli.main([*args, "--palette", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("maskformers check-data: cannot read palette") and "missing.json" in err
    assert len(err.splitlines()) == 1
    assert cli.main(["check-data", "--data", "semantic-folder", "--images", str(tmp_path / "nope"), "--labels",
                     str(labels), "--id2label", str(tmp_path / "id2label.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maskformers check-data: images folder") and err.strip().endswith("nope: no such folder")


def test_check_data_coco_empty_segments(tmp_path, capsys):
    pytest.importorskip("pycocotools")
    (tmp_path / "images").mkdir()
    PIL.Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "images" / "x.png")
    anns = [{"id": 1, "image_id": 7, "category_id": 3, "iscrowd": 0, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]},
            {"id": 2, "image_id": 7, "category_id": 3, "iscrowd": 0, "segmentation": [[1, 1, 1, 1, 1, 1]]}]
    data = {"images": [{"id": 7, "file_name": "x.png", "height": 10, "width": 12}], "annotations": anns,
            "categories": [{"id": 3, "name": "cat"}]}
    (tmp_path / "inst.json").write_text(json.dumps(data))
    rc = cli.main(["check-data", "--data", "coco-instance", "--images", str(tmp_path / "images"), "--annotations",
                   str(tmp_path / "inst.json"), "--overlays", "0", "--quiet"])
    assert rc == 1
    assert "x.png: annotation 2 (cat) covers no pixel" in capsys.readouterr().out
