"""Fine-tuning runs a user can trust (issue 14): `maskformers train` and `maskformers.finetune` on small datasets
written to disk, one test per way a run used to go silently wrong or get wrecked."""

from __future__ import annotations

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from finetune_helpers import (
    SEMANTIC_CLASSES,
    TINY,
    write_coco_instances,
    write_coco_panoptic,
    write_id2label,
    write_semantic_folder,
)

from maskformers import cli
from maskformers.training import builtin

SEMANTIC_SIZE = (72, 96)  # median shortest side 72 -> semantic crop 96; longest side 96 -> panoptic crop 96
FAST = ["--steps", "2", "--batch-size", "2", "--num-points", "100", "--quiet"]


@pytest.fixture(scope="module")
def semantic(tmp_path_factory):
    """A semantic folder (train 8, val 3) of 5 classes other than the built-in model's 8, and a tiny config."""
    root = tmp_path_factory.mktemp("semantic")
    write_semantic_folder(root / "images" / "train", root / "labels" / "train", n=8, size=SEMANTIC_SIZE)
    write_semantic_folder(root / "images" / "val", root / "labels" / "val", n=3, size=SEMANTIC_SIZE, seed=99)
    write_id2label(root / "id2label.json")
    from maskformers.models.mask2former import Mask2FormerConfig, build_mask2former

    torch.manual_seed(0)  # a small trained-model folder of the data's own classes: no new head
    build_mask2former(Mask2FormerConfig.from_dict({**TINY, "num_classes": 5}),
                      id2label=dict(enumerate(SEMANTIC_CLASSES))).save_pretrained(root / "tiny-model")
    return root


def _data(root, val=False):
    args = ["--data", "semantic-folder", "--images", str(root / "images" / "train"), "--labels",
            str(root / "labels" / "train"), "--id2label", str(root / "id2label.json")]
    if val:
        args += ["--val-images", str(root / "images" / "val"), "--val-labels", str(root / "labels" / "val")]
    return args


def _train(capsys, *args):
    capsys.readouterr()
    rc = cli.main(["train", *map(str, args)])
    return rc, capsys.readouterr().err


def _losses(out):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# ---------------------------------------------------------------------------------------------- item 1, 16
def test_train_refuses_other_classes_and_finetune_gives_a_new_head(semantic, tmp_path):
    import maskformers
    from maskformers.training.config import TrainingConfig
    from maskformers.training.data import TrainingDataset
    from maskformers.training.loop import train
    from maskformers.training.readers_semantic import SemanticFolder

    reader = SemanticFolder(semantic / "images" / "train", semantic / "labels" / "train",
                            id2label=json.loads((semantic / "id2label.json").read_text()))
    model = builtin.load_builtin_model()
    with pytest.raises(ValueError, match=r"classes .* differ from the data's .*maskformers.finetune"):
        train(model, TrainingDataset(reader, task="semantic"), config=TrainingConfig(max_steps=1), progress=False)
    with pytest.raises(TypeError, match="takes a TrainingDataset.*SemanticFolder, a reader of samples"):
        train(model, reader, config=TrainingConfig(max_steps=1), progress=False)
    assert model.num_classes == 8  # refused: nothing changed

    result = maskformers.finetune(model, reader, out=tmp_path / "run", max_steps=2, batch_size=2, num_points=100,
                                  progress=False)
    assert result.final == tmp_path / "run" / "final" and result.step == 2
    saved = json.loads((result.final / "maskformers_config.json").read_text())
    assert saved["id2label"] == {"0": "shape", "1": "sky", "2": "grass", "3": "water", "4": "sand"}
    assert saved["config"]["num_classes"] == 5 and model.num_classes == 5


# ---------------------------------------------------------------------------------------------- item 3
def test_skipped_samples_are_listed_and_a_high_skip_rate_stops_the_run(semantic, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(semantic / "images", data / "images")
    shutil.copytree(semantic / "labels", data / "labels")
    bad = data / "images" / "train" / "scene-3.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG
    args = ["--data", "semantic-folder", "--images", data / "images" / "train", "--labels", data / "labels" / "train",
            "--id2label", semantic / "id2label.json", "--model", semantic / "tiny-model", "--on-error", "skip"]
    rc, err = _train(capsys, *args, *FAST, "--steps", "8", "--max-skip-rate", "0.2", "--out", tmp_path / "ok")
    assert rc == 0, err
    skipped = [s for r in map(json.loads, (tmp_path / "ok" / "log.jsonl").read_text().splitlines())
               for s in r.get("skipped", [])]
    assert [s["index"] for s in skipped] == [3] and "scene-3.jpg" in skipped[0]["reason"]
    assert "skipped sample #3" in err and "1 distinct sample(s) of 8" in err

    for image in (data / "images" / "train").iterdir():  # now every sample is bad
        image.write_bytes(image.read_bytes()[:200])
    rc, err = _train(capsys, *args, *FAST, "--out", tmp_path / "bad")
    assert rc == 1
    assert "could not be used, more than max_skip_rate 0.1" in err and "scene-" in err
    assert not (tmp_path / "bad" / "final").exists()  # no model from a run that trained on nothing


# ---------------------------------------------------------------------------------------------- item 4, 13
@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    for split, n, seed in (("train", 6, 11), ("val", 4, 12)):
        write_coco_panoptic(root / f"{split}2017", root / f"panoptic_{split}2017", root / f"panoptic_{split}2017.json",
                            n=n, seed=seed)
    return root


def _coco(root, split, prefix=""):
    return [f"--{prefix}images", root / f"{split}2017", f"--{prefix}panoptic-dir", root / f"panoptic_{split}2017",
            f"--{prefix}annotations", root / f"panoptic_{split}2017.json"]


def test_saved_models_carry_their_preprocessing_and_segment_matches_evaluate(coco, tmp_path, capsys):
    import maskformers
    from maskformers import ImageProcessor
    from maskformers.evaluation.panoptic_quality import PanopticQuality
    from maskformers.training.data import panoptic_map
    from maskformers.training.readers_coco import CocoPanoptic

    out = tmp_path / "run"
    rc, err = _train(capsys, "--model", "builtin", "--data", "coco-panoptic", *_coco(coco, "train"),
                     *_coco(coco, "val", "val-"), *FAST, "--steps", "1", "--lr", "1e-6", "--out", out)
    assert rc == 0, err
    assert "step 1 eval: PQ" in err  # item 13: metrics on the console as they are computed
    for folder in (out / "final", out / "best"):
        config = json.loads((folder / "preprocessor_config.json").read_text())
        assert config["size"] == {"max_height": 128, "max_width": 128}  # crop 128: the images' longest side
        assert config["class_info"]["0"] == {"name": "circle", "isthing": 1}
        assert config["class_info"]["4"] == {"name": "sky", "isthing": 0}
        assert ImageProcessor.from_pretrained(folder).output_size(96, 128) == (96, 128)

    metrics = tmp_path / "metrics.json"
    assert cli.main(["evaluate", "--model", str(out / "best"), "--data", "coco-panoptic",
                     *map(str, _coco(coco, "val")), "--task", "panoptic", "--json", str(metrics)]) == 0
    evaluated = json.loads(metrics.read_text())["metrics"]
    assert evaluated["PQ"] > 20  # a trained model: the comparison below is between real segments

    assert cli.main(["segment", str(coco / "val2017"), "--model", str(out / "best"), "--task", "panoptic",
                     "--threshold", "0.8", "--out", str(tmp_path / "seg"), "--quiet"]) == 0
    reader = CocoPanoptic(coco / "val2017", coco / "panoptic_val2017", coco / "panoptic_val2017.json")
    pq = PanopticQuality(num_classes=8, thing_ids=reader.thing_ids)
    for i in range(len(reader)):
        stem = reader.images[i]["file_name"].rsplit(".", 1)[0]
        pred = torch.from_numpy(np.asarray(PIL.Image.open(tmp_path / "seg" / f"{stem}_segmentation.png"))
                                .astype(np.int64))
        segments = json.loads((tmp_path / "seg" / f"{stem}_segments.json").read_text())["segments"]
        gt, gt_segments = panoptic_map(reader[i])
        pq.update(pred, segments, gt, gt_segments)
    assert pq.compute()["PQ"] == evaluated["PQ"]

    # the Python API on the saved folder: the same map as segment's for an image
    model = maskformers.from_pretrained(out / "best")
    processor = ImageProcessor.from_pretrained(out / "best")
    inputs = processor(PIL.Image.open(coco / "val2017" / reader.images[0]["file_name"]))
    with torch.inference_mode():
        output = model(inputs["pixel_values"])
    result = maskformers.post_process_panoptic(output.class_logits, output.mask_logits, threshold=0.8,
                                               input_size=inputs["pixel_values"].shape[-2:],
                                               image_sizes=inputs["image_sizes"], target_sizes=inputs["original_sizes"])
    stem = reader.images[0]["file_name"].rsplit(".", 1)[0]
    assert np.array_equal(result[0]["segmentation"].numpy(),
                          np.asarray(PIL.Image.open(tmp_path / "seg" / f"{stem}_segmentation.png")))


# ---------------------------------------------------------------------------------------------- item 5
def test_same_seed_gives_bit_identical_runs(semantic, tmp_path, capsys):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):  # from a checkpoint folder, with other classes than the data's
        rc, err = _train(capsys, "--model", builtin.builtin_model_dir(), *_data(semantic), *FAST, "--seed", seed,
                         "--out", tmp_path / name)
        assert rc == 0, err
        assert "new class head for 5 classes (was 8" in err
        runs[name] = (_losses(tmp_path / name), _weights(tmp_path / name / "final"))
    (la, wa), (lb, wb), (_, wc) = runs["a"], runs["b"], runs["c"]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["transformer_decoder.head.class_embed.weight"],
                           wc["transformer_decoder.head.class_embed.weight"])


# ---------------------------------------------------------------------------------------------- item 6
def test_output_folder_holds_one_run(semantic, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--model", semantic / "tiny-model", *_data(semantic, val=True), *FAST, "--out", out]
    rc, err = _train(capsys, *base, "--steps", "6", "--checkpoint-every", "2")
    assert rc == 0, err
    first_log = (out / "log.jsonl").read_text()

    rc, err = _train(capsys, *base)  # the same folder again: refused, nothing touched
    assert rc == 2 and err.count("\n") == 1
    assert f"--out {out} is not empty" in err and "--resume" in err and "--overwrite" in err
    assert (out / "log.jsonl").read_text() == first_log

    rc, err = _train(capsys, *base, "--overwrite")  # a shorter run: its checkpoints must survive the keep rule
    assert rc == 0, err
    old = tmp_path / "run.old-1"
    assert (old / "log.jsonl").read_text() == first_log and (old / "checkpoint-00000006.pt").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*.pt")) == ["checkpoint-00000002.pt"]
    assert [r["step"] for r in _losses(out)] == [2]
    best = torch.load(out / "best.pt", weights_only=False)["best"]
    assert best["step"] == 2


# ---------------------------------------------------------------------------------------------- item 7, 8
def test_resume_needs_only_out_and_restores_the_settings(semantic, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = _train(capsys, "--model", "builtin", *_data(semantic), *FAST, "--lr", "2e-4", "--crop-size", "64",
                     "--checkpoint-every", "1", "--log-every", "1", "--out", out)
    assert rc == 0, err
    config = json.loads((out / "run_config.json").read_text())
    assert config["args"]["lr"] == 2e-4 and config["training"]["max_steps"] == 2
    assert config["data"]["crop_size"] == 64 and config["versions"]["torch"] == torch.__version__
    assert config["command"][:4] == ["maskformers", "train", "--model", "builtin"]
    shutil.rmtree(out / "final")  # as after a crash: no final/ or best/ yet
    (out / "checkpoint-00000002.pt").unlink()

    rc, err = _train(capsys, "--resume", "--out", out, "--quiet")  # no data options: they come from the run
    assert rc == 0, err
    assert [r["step"] for r in _losses(out)] == [1, 2] and (out / "final" / "model.safetensors").is_file()

    rc, err = _train(capsys, "--model", out / "best", "--resume", "--out", out, "--steps", "3", "--quiet")
    assert rc == 0, err  # the README's old line: --model is not read back, --steps extends the run
    assert "--steps 2 -> 3" in err and "--model" in err and "ignored" in err
    config = json.loads((out / "run_config.json").read_text())
    assert config["training"]["max_steps"] == 3 and config["training"]["lr"] == 2e-4
    assert config["data"]["crop_size"] == 64 and config["resumes"][-1]["changed"]["steps"] == {"was": 2, "now": 3}
    assert [r["step"] for r in _losses(out)] == [1, 2, 3]

    rc, err = _train(capsys, "--resume", "--out", tmp_path / "nothing", "--quiet")
    assert rc == 2 and "no run to continue" in err


# ---------------------------------------------------------------------------------------------- item 9
def test_defaults_come_from_the_data_and_help_shows_them(semantic, coco, tmp_path, capsys):
    rc, err = _train(capsys, "--model", semantic / "tiny-model", *_data(semantic), *FAST, "--out",
                     tmp_path / "sem")
    assert rc == 0, err
    assert "settings: task semantic, 2 steps, batch 2, crop 96 (images typically 72x96)" in err
    rc, err = _train(capsys, "--model", semantic / "tiny-model", "--data", "coco-panoptic",
                     *_coco(coco, "train"), *FAST, "--out", tmp_path / "pan")
    assert rc == 0, err
    assert "settings: task panoptic, 2 steps, batch 2, crop 128 (images typically 96x128)" in err
    assert json.loads((tmp_path / "pan" / "run_config.json").read_text())["data"]["crop_size"] == 128

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("optimizer steps (default: 1000)", "images per step and process (default: 2)",
                     "(default: 0.0001)", "linear warm-up steps (default: 0)", "capped at 1024)",
                     "(default: panoptic when the data has thing classes, else semantic",
                     "newest checkpoints kept (0: all) (default: 2)", "(default: 0.1)", "(default: raise)",
                     "--ignore-index IGNORE_INDEX (default: 255)", "or 'builtin' (the shipped built-in model)"):
        assert expected in text, expected


# ---------------------------------------------------------------------------------------------- item 10
def test_model_builtin_is_the_shipped_model_and_from_scratch_is_explicit(tmp_path, capsys):
    shipped = _weights(builtin.builtin_model_dir())
    synthetic = ["--data", "synthetic", "--scenes", "4", "--size", "64", "--val-scenes", "0"]
    rc, err = _train(capsys, "--model", "builtin", *synthetic, *FAST, "--steps", "1", "--lr", "1e-12",
                     "--out", tmp_path / "tuned")
    assert rc == 0, err
    tuned = _weights(tmp_path / "tuned" / "final")
    for k in shipped:  # one step of lr 1e-12 from the shipped weights
        torch.testing.assert_close(tuned[k], shipped[k], rtol=0, atol=1e-9, msg=k)

    rc, err = _train(capsys, "--from-scratch", "builtin", *synthetic, *FAST, "--steps", "1", "--lr", "1e-12",
                     "--out", tmp_path / "new")
    assert rc == 0, err
    new = _weights(tmp_path / "new" / "final")
    key = "transformer_decoder.head.class_embed.weight"
    assert (new[key] - shipped[key]).abs().max() > 1e-3

    rc, err = _train(capsys, "--recipe", "builtin", *FAST, "--steps", "1", "--scenes", "4", "--val-scenes", "0",
                     "--out", tmp_path / "recipe")
    assert rc == 0, err
    options = json.loads((tmp_path / "recipe" / "run_config.json").read_text())["args"]
    assert options["recipe"] == "builtin" and "model" not in options

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    rc, err = _train(capsys, "--model", config, *synthetic, *FAST, "--out", tmp_path / "cfg")
    assert rc == 2 and "is a model config, not a trained model" in err and "--from-scratch" in err


# ---------------------------------------------------------------------------------------------- item 11
def test_input_errors_are_one_line_with_exit_code_2(semantic, tmp_path, capsys):
    start = ["--model", semantic / "tiny-model"]

    def one_line(rc, err, *needles):
        assert rc == 2, err
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith("maskformers train: ") and all(n in last for n in needles), last

    data = tmp_path / "data"
    shutil.copytree(semantic / "images", data / "images")
    shutil.copytree(semantic / "labels", data / "labels")
    for image in (data / "images" / "train").iterdir():  # truncated JPEGs
        image.write_bytes(image.read_bytes()[:300])
    one_line(*_train(capsys, *start, "--data", "semantic-folder", "--images", data / "images" / "train", "--labels",
                     data / "labels" / "train", "--id2label", semantic / "id2label.json", *FAST, "--out",
                     tmp_path / "a"), "scene-", ".jpg", "--on-error skip")

    one_line(*_train(capsys, *start, *_data(semantic), *FAST, "--batch-size", "9", "--out", tmp_path / "b"),
             "--batch-size", "9", "8 sample(s)")

    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *map(str, start), *map(str, _data(semantic)), "--steps", "0", "--out", str(tmp_path / "c")])
    assert exc.value.code == 2 and "argument --steps: must be >= 1, got '0'" in capsys.readouterr().err

    listed = tmp_path / "list.json"  # a list of names is an id2label too
    listed.write_text(json.dumps(["shape", "sky", "grass", "water", "sand"]))
    rc, err = _train(capsys, *start, "--data", "semantic-folder", "--images", semantic / "images" / "train",
                     "--labels", semantic / "labels" / "train", "--id2label", listed, *FAST, "--out", tmp_path / "d")
    assert rc == 0, err
    listed.write_text(json.dumps({"a": "shape"}))
    one_line(*_train(capsys, *start, "--data", "semantic-folder", "--images", semantic / "images" / "train",
                     "--labels", semantic / "labels" / "train", "--id2label", listed, *FAST, "--out", tmp_path / "e"),
             "--id2label", str(listed), "integers")

    one_based = tmp_path / "one-based"  # labels 1..5 with 0 as background, as ADE20K stores them
    for label in (semantic / "labels" / "train").iterdir():
        array = np.asarray(PIL.Image.open(label)).copy() + 1
        array[:4], array[-1] = 0, 5  # background on top, the last class (1-based id 5) at the bottom
        (one_based / label.name).parent.mkdir(exist_ok=True)
        PIL.Image.fromarray(array).save(one_based / label.name)
    one_line(*_train(capsys, *start, "--data", "semantic-folder", "--images", semantic / "images" / "train",
                     "--labels", one_based, "--id2label", semantic / "id2label.json", *FAST, "--out", tmp_path / "f"),
             "scene-", "unknown class id(s) [5]", "--reduce-labels")
    rc, err = _train(capsys, *start, "--data", "semantic-folder", "--images", semantic / "images" / "train",
                     "--labels", one_based, "--id2label", semantic / "id2label.json", "--reduce-labels", *FAST,
                     "--out", tmp_path / "g")
    assert rc == 0, err


def test_empty_polygon_list_is_a_bad_sample(semantic, tmp_path, capsys):
    def args(name, bad):
        write_coco_instances(tmp_path / name, tmp_path / f"{name}.json", n=8, empty_polygon_in=bad)
        return ["--model", semantic / "tiny-model", "--data", "coco-instance", "--images", tmp_path / name,
                "--annotations", tmp_path / f"{name}.json", "--task", "instance", *FAST]

    rc, err = _train(capsys, *args("all-bad", tuple(range(8))), "--out", tmp_path / "raise")
    assert rc == 2 and "Traceback" not in err
    assert ".jpg: bad segmentation in annotation" in err and "empty polygon list" in err
    rc, err = _train(capsys, *args("one-bad", (2,)), "--steps", "4", "--on-error", "skip", "--max-skip-rate", "0.2",
                     "--out", tmp_path / "skip")
    assert rc == 0, err
    assert "skipped sample #2" in err and "empty polygon list" in err


# ---------------------------------------------------------------------------------------------- item 15
def test_tuning_options_reach_the_run(semantic, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = _train(capsys, "--model", "builtin", *_data(semantic), *FAST, "--steps", "3", "--warmup-steps", "2",
                     "--log-every", "1", "--keep-checkpoints", "1", "--checkpoint-every", "1", "--freeze-backbone",
                     "--thing-ids", "shape", "--out", out)
    assert rc == 0, err
    training = json.loads((out / "run_config.json").read_text())["training"]
    assert training["warmup_steps"] == 2 and training["freeze_backbone"] and training["keep_checkpoints"] == 1
    records = _losses(out)
    assert [r["step"] for r in records] == [1, 2, 3] and records[0]["lr"] < records[2]["lr"] / 10  # warm-up
    assert [p.name for p in out.glob("checkpoint-*.pt")] == ["checkpoint-00000003.pt"]
    shipped, tuned = _weights(builtin.builtin_model_dir()), _weights(out / "final")
    assert all(torch.equal(tuned[k], shipped[k]) for k in shipped if k.startswith("backbone."))
    assert not torch.equal(tuned["pixel_decoder.mask_features.weight"], shipped["pixel_decoder.mask_features.weight"])
    info = json.loads((out / "final" / "preprocessor_config.json").read_text())["class_info"]
    assert info["0"] == {"name": "shape", "isthing": 1} and info["1"]["isthing"] == 0


def test_callbacks_and_early_stopping(semantic, tmp_path):
    from maskformers.models.mask2former import Mask2FormerConfig, build_mask2former
    from maskformers.training.config import TrainingConfig
    from maskformers.training.data import TrainingDataset
    from maskformers.training.loop import train
    from maskformers.training.synthetic import SyntheticScenes

    torch.manual_seed(0)
    model = build_mask2former(Mask2FormerConfig.from_dict(TINY))
    data = TrainingDataset(SyntheticScenes(8, size=64, seed=1), task="panoptic")
    steps, evals = [], []
    config = TrainingConfig(max_steps=20, batch_size=2, num_points=100, eval_every=1, early_stopping_patience=2)
    result = train(model, data, config=config, output_dir=tmp_path / "a", val_dataset=SyntheticScenes(1, size=64),
                   progress=False, evaluate_fn=lambda *a, **k: {"PQ": 50.0 if not evals else 40.0},
                   on_step=lambda record: steps.append(record["step"]),
                   on_eval=lambda step, metrics: evals.append((step, metrics["PQ"])))
    assert steps == [1, 2, 3] and evals == [(1, 50.0), (2, 40.0), (3, 40.0)]
    assert result.step == 3 and result.stopped.startswith("early stopping: PQ did not improve on step 1's 50.00")
    assert (tmp_path / "a" / "checkpoint-00000003.pt").is_file()  # the stopped run can be resumed

    result = train(model, data, config=TrainingConfig(max_steps=20, batch_size=2, num_points=100), progress=False,
                   on_step=lambda record: record["step"] == 2)
    assert result.step == 2 and result.stopped == "on_step asked to stop"


# ---------------------------------------------------------------------------------------------- item 16
def test_finetune_takes_a_reader_a_training_dataset_or_hf_style_rows(semantic, tmp_path):
    import maskformers
    from maskformers.training.data import TrainingDataset
    from maskformers.training.readers_semantic import SemanticFolder

    id2label = {int(k): v for k, v in json.loads((semantic / "id2label.json").read_text()).items()}
    reader = SemanticFolder(semantic / "images" / "train", semantic / "labels" / "train", id2label=id2label)
    val = SemanticFolder(semantic / "images" / "val", semantic / "labels" / "val", id2label=id2label)
    common = dict(max_steps=2, batch_size=2, num_points=100, progress=False)

    result = maskformers.finetune("builtin", reader, val_data=val, out=tmp_path / "reader", **common)
    assert result.best_model == tmp_path / "reader" / "best" and result.best["metric"] == "mIoU"
    for name in ("final", "best"):  # the CLI's folders
        assert {p.name for p in (tmp_path / "reader" / name).iterdir()} == {
            "model.safetensors", "maskformers_config.json", "preprocessor_config.json"}

    dataset = TrainingDataset(reader, task="semantic")
    result = maskformers.finetune(builtin.load_builtin_model(), dataset, out=tmp_path / "dataset", **common)
    assert result.settings["training"]["task"] == "semantic" and result.final.is_dir()

    class Rows:  # what a datasets.Dataset looks like to finetune: rows of PIL images and label maps
        column_names = ["image", "annotation"]
        features = {}

        def __len__(self):
            return len(reader)

        def __getitem__(self, i):
            image_path, label_path = reader.pairs[i]
            return {"image": PIL.Image.open(image_path), "annotation": PIL.Image.open(label_path)}

    with pytest.raises(ValueError, match="datasets.Dataset needs id2label"):
        maskformers.finetune("builtin", Rows(), out=tmp_path / "rows", **common)
    result = maskformers.finetune("builtin", Rows(), id2label=id2label, out=tmp_path / "rows", **common)
    assert result.step == 2 and json.loads((tmp_path / "rows" / "final" / "maskformers_config.json").read_text())[
        "id2label"]["4"] == "sand"
    with pytest.raises(TypeError, match="unknown argument.*'steps'"):
        maskformers.finetune("builtin", reader, out=tmp_path / "typo", steps=3)
