"""`maskformers train`, `maskformers evaluate` and `maskformers demo` end to end on a tiny model."""

from __future__ import annotations

import json

import pytest

from maskformers import cli
from maskformers.training import builtin

TINY = {
    "backbone": {"name": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4},
    "num_classes": 8, "num_queries": 6, "hidden_dim": 32, "conv_dim": 32, "mask_dim": 32, "num_heads": 2,
    "encoder_layers": 1, "encoder_ffn_dim": 32, "decoder_layers": 2, "decoder_ffn_dim": 32,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "tiny.json").write_text(json.dumps(TINY))
    out = root / "run"
    rc = cli.main(["train", "--from-scratch", str(root / "tiny.json"), "--data", "synthetic", "--scenes", "8",
                   "--size", "64", "--steps", "2", "--batch-size", "2", "--num-points", "100", "--eval-every", "2",
                   "--val-scenes", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    return root, out


def test_train_writes_log_checkpoint_and_models(trained, capsys):
    root, out = trained
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2]  # log_every 10: the last step is always logged
    assert any("eval" in r and "PQ" in r["eval"] for r in records)
    assert (out / "checkpoint-00000002.pt").is_file() and (out / "best.pt").is_file()
    for name in ("final", "best"):
        assert (out / name / "model.safetensors").is_file() and (out / name / "maskformers_config.json").is_file()
    saved = json.loads((out / "final" / "maskformers_config.json").read_text())
    assert "circle" in json.dumps(saved)  # the dataset's labels replaced the config-only model's


def test_resume_continues_to_more_steps(trained):
    root, out = trained
    rc = cli.main(["train", "--from-scratch", str(root / "tiny.json"), "--data", "synthetic", "--scenes", "8",
                   "--size", "64", "--steps", "3", "--batch-size", "2", "--num-points", "100", "--val-scenes", "0",
                   "--out", str(out), "--resume", "--quiet"])
    assert rc == 0
    assert (out / "checkpoint-00000003.pt").is_file()


def test_evaluate_prints_a_table_and_writes_json(trained, capsys):
    _, out = trained
    path = out / "metrics.json"
    rc = cli.main(["evaluate", "--model", str(out / "final"), "--data", "synthetic", "--scenes", "3", "--size", "64",
                   "--task", "panoptic", "--task", "semantic", "--json", str(path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "PQ" in text and "mIoU" in text
    metrics = json.loads(path.read_text())["metrics"]
    assert 0 <= metrics["PQ"] <= 100 and 0 <= metrics["mIoU"] <= 100


def test_demo_without_weights_says_how_to_make_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(builtin, "builtin_model_dir", lambda: tmp_path / "missing")
    assert cli.main(["demo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "not installed" in err and "maskformers train --recipe builtin" in err


def test_demo_with_weights(trained, tmp_path, monkeypatch, capsys):
    _, out = trained
    monkeypatch.setattr(builtin, "builtin_model_dir", lambda: out / "final")
    monkeypatch.setattr(builtin, "BUILTIN_IMAGE_SIZE", 64)
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--scenes", "2"]) == 0
    text = capsys.readouterr().out
    assert "panoptic quality on 2 held-out scenes: PQ" in text
    assert (tmp_path / "demo" / "overlay.png").is_file() and (tmp_path / "demo" / "scene.png").is_file()


def test_bad_data_arguments_exit_with_a_message(tmp_path, capsys):
    assert cli.main(["train", "--data", "coco-panoptic", "--out", str(tmp_path), "--quiet"]) == 2
    assert capsys.readouterr().err == "maskformers train: --data coco-panoptic needs --images and --annotations\n"
    assert cli.main(["train", "--data", "semantic-folder", "--out", str(tmp_path), "--quiet"]) == 2
    assert "needs --id2label" in capsys.readouterr().err


ONEFORMER = {**TINY, "model_type": "oneformer", "num_queries": 8, "query_dec_layers": 1, "with_text_mapper": True,
             "text_width": 32, "text_layers": 1, "text_heads": 2, "text_context_length": 16, "text_n_ctx": 2}


@pytest.fixture(scope="module")
def trained_oneformer(tmp_path_factory):
    """A OneFormer config trained by `maskformers train` with CLIP's released merge list as --tokenizer."""
    from oneformer_helpers import clip_bpe_file

    root = tmp_path_factory.mktemp("cli-oneformer")
    (root / "oneformer.json").write_text(json.dumps(ONEFORMER))
    out = root / "run"
    rc = cli.main(["train", "--from-scratch", str(root / "oneformer.json"), "--tokenizer", str(clip_bpe_file()),
                   "--data", "synthetic", "--scenes", "8", "--size", "64", "--steps", "2", "--batch-size", "2",
                   "--num-points", "100", "--eval-every", "2", "--val-scenes", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    return root, out


def test_train_a_oneformer_and_use_it(trained_oneformer, tmp_path, capsys):
    import PIL.Image

    from maskformers.training.synthetic import SyntheticScenes

    root, out = trained_oneformer
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert "loss_contrastive" in records[0] and any("PQ" in r.get("eval", {}) for r in records)
    for name in ("final", "best"):  # weights + config + what segment/evaluate need: tokenizer, class info
        for file in ("model.safetensors", "maskformers_config.json", "vocab.json", "merges.txt",
                     "preprocessor_config.json"):
            assert (out / name / file).is_file(), (name, file)
    saved = json.loads((out / "final" / "maskformers_config.json").read_text())
    assert saved["model_type"] == "oneformer" and saved["id2label"]["4"] == "sky"
    processor = json.loads((out / "final" / "preprocessor_config.json").read_text())
    assert processor["class_info"]["0"] == {"name": "circle", "isthing": 1} and processor["num_text"] == 6

    path = tmp_path / "metrics.json"
    rc = cli.main(["evaluate", "--model", str(out / "final"), "--data", "synthetic", "--scenes", "2", "--size", "64",
                   "--task", "panoptic", "--task", "semantic", "--task", "instance", "--json", str(path)])
    assert rc == 0
    metrics = json.loads(path.read_text())["metrics"]
    assert all(0 <= metrics[k] <= 100 for k in ("PQ", "mIoU", "AP"))

    scene = SyntheticScenes(1, size=64, seed=3)[0]
    PIL.Image.fromarray(scene["image"].permute(1, 2, 0).numpy()).save(tmp_path / "scene.png")
    for task in ("panoptic", "instance"):
        rc = cli.main(["segment", str(tmp_path / "scene.png"), "--model", str(out / "best"), "--task", task,
                       "--out", str(tmp_path / task), "--quiet"])
        assert rc == 0 and (tmp_path / task / "scene_segments.json").is_file()

    capsys.readouterr()
    rc = cli.main(["train", "--from-scratch", str(root / "oneformer.json"), "--data", "synthetic", "--scenes", "4",
                   "--size", "64", "--steps", "1", "--out", str(tmp_path / "none"), "--quiet"])
    assert rc == 2 and "needs its CLIP tokenizer" in capsys.readouterr().err  # a config alone has no tokenizer
