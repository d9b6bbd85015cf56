"""Publishing to the hub: `maskformers push RUN_DIR REPO_ID` and `model.push_to_hub(repo_id)` against a local
stand-in of the hub's API (tests/hub_standin.py): the exact files uploaded, the model card, and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_standin import HubStandIn
from huggingface_hub import ModelCard

from maskformers import cli, from_pretrained
from maskformers.publish import PublishError, _evaluation_of, check_repo_id, read_run
from maskformers.training.synthetic import SYNTHETIC_CLASSES

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "backbone": {"name": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4},
    "num_classes": 8, "num_queries": 6, "hidden_dim": 32, "conv_dim": 32, "mask_dim": 32, "num_heads": 2,
    "encoder_layers": 1, "encoder_ffn_dim": 32, "decoder_layers": 2, "decoder_ffn_dim": 32,
}
TRAIN_ARGS = ["--data", "synthetic", "--scenes", "8", "--size", "64", "--steps", "2", "--batch-size", "2",
              "--num-points", "100", "--eval-every", "1", "--val-scenes", "2", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real training run folder (2 steps, an evaluation after each), with a run_config.json."""
    root = tmp_path_factory.mktemp("push")
    (root / "tiny.json").write_text(json.dumps(TINY))
    out = root / "run"
    argv = ["train", "--from-scratch", str(root / "tiny.json"), *TRAIN_ARGS, "--out", str(out)]
    assert cli.main(argv) == 0
    config = out / "run_config.json"
    if not config.is_file():  # written by newer `maskformers train`; the same keys by hand otherwise
        config.write_text(json.dumps({"command": ["maskformers", *argv], "args": {"data": "synthetic", "scenes": 8,
                                      "size": 64, "task": "panoptic"}, "versions": {"maskformers": "0.1.0"}}))
    return out


def _env(hub: HubStandIn, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HOME": str(tmp_path / "hf-home"),
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]), **extra}


def test_push_uploads_the_best_model_with_its_card(run_dir, tmp_path):
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert len(evals) == 2
    best = max(evals, key=lambda r: (r["eval"]["PQ"], -r["step"]))  # the loop keeps the first maximum

    with HubStandIn() as hub:
        proc = subprocess.run([sys.executable, "-m", "maskformers", "push", str(run_dir), "alice/tiny-synthetic"],
                              env=_env(hub, tmp_path), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert hub.unexpected == []
        assert hub.repos["alice/tiny-synthetic"]["type"] == "model"
        assert len(hub.validated) == 1  # the client had the card's metadata checked before committing
        assert [c["repo"] for c in hub.commits] == ["alice/tiny-synthetic"]  # one commit
        files = hub.files["alice/tiny-synthetic"]
    assert "pushed" in proc.stdout and f"{hub.url}/alice/tiny-synthetic/commit/" in proc.stdout
    assert sorted(files) == ["README.md", "maskformers_config.json", "model.safetensors", "preprocessor_config.json",
                             "run_config.json"]
    for name in ("maskformers_config.json", "model.safetensors"):
        assert files[name] == (run_dir / "best" / name).read_bytes()  # best/, not final/
    assert files["run_config.json"] == (run_dir / "run_config.json").read_bytes()

    # what was uploaded loads back as the same model
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    for name, content in files.items():
        (downloaded / name).write_bytes(content)
    got, want = from_pretrained(downloaded).state_dict(), from_pretrained(run_dir / "best").state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)

    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "maskformers" and card.data.pipeline_tag == "image-segmentation"
    assert {"maskformers", "mask2former", "panoptic-segmentation"} <= set(card.data.tags)
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results["PQ"] == round(best["eval"]["PQ"], 4) and results["SQ"] == round(best["eval"]["SQ"], 4)
    assert {r.dataset_type for r in card.data.eval_results} == {"synthetic"}
    text = card.text
    assert f"at step {best['step']}:" in text
    assert ", ".join(f"{i} {name}" for i, name in enumerate(SYNTHETIC_CLASSES)) in text
    n = sum(v.numel() for v in want.values())
    assert f"| parameters | {n / 1e6:.2f} M |" in text and "| queries | 6 |" in text
    assert "| backbone | swin (embed_dim 16, depths [1, 1, 1, 1], num_heads [1, 1, 2, 2], window_size 4) |" in text
    command = json.loads((run_dir / "run_config.json").read_text())["command"]
    assert f"- command: `{' '.join(command)}`" in text and "- data: synthetic; scenes `8`, size `64`" in text
    assert "- steps: 2" in text and "- weights: `best/` of the run" in text
    assert 'maskformers.from_pretrained("alice/tiny-synthetic")' in text


def test_model_push_to_hub_from_python(tmp_path):
    from maskformers.training.builtin import build_builtin_model

    model = build_builtin_model()
    with HubStandIn() as hub:
        url = model.push_to_hub("bob/untrained", endpoint=hub.url, token=hub.token, commit_message="first")
        assert hub.unexpected == [] and hub.commits[0]["summary"] == "first"
        files = hub.files["bob/untrained"]
    assert url.startswith(f"{hub.url}/bob/untrained/commit/")
    assert sorted(files) == ["README.md", "maskformers_config.json", "model.safetensors"]
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "maskformers" and not card.data.eval_results
    assert "Not recorded: this model was published without its training run folder." in card.text
    assert "Not recorded: the run's log.jsonl holds no evaluation" in card.text


def test_push_dry_run_and_a_run_without_run_config(run_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    (bare / "final").mkdir(parents=True)
    for name in ("model.safetensors", "maskformers_config.json"):
        (bare / "final" / name).write_bytes((run_dir / "final" / name).read_bytes())
    (bare / "log.jsonl").write_text((run_dir / "log.jsonl").read_text() + '{"step": 2, "eval": {"PQ": 1\n')  # cut
    assert cli.main(["push", str(bare), "carol/m", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload to carol/m:" in out and "run_config.json" not in out.split("---")[0]
    assert "  model.safetensors  (" in out and "  README.md  (" in out
    assert "- command: not recorded (the run has no run_config.json)" in out and "- weights: `final/` of the run" in out
    last = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if '"eval"' in line][-1]
    assert "at step 2:" in out and f"| PQ | {last['eval']['PQ']:.2f} |" in out  # final/: the last evaluation


def test_evaluation_of_picks_the_weights_evaluation():
    records = [{"step": 1, "loss": 3.0}, {"step": 1, "eval": {"PQ": 10.0}}, {"step": 2, "eval": {"PQ": 30.0}},
               {"step": 3, "eval": {"PQ": 30.0}}, {"step": 4, "eval": {"PQ": 20.0}}, {"step": 5, "loss": 1.0}]
    assert _evaluation_of("best", records) == {"step": 2, "metrics": {"PQ": 30.0}}  # the first maximum
    assert _evaluation_of("final", records) is None  # step 5 was not evaluated
    assert _evaluation_of("final", records[:-1]) == {"step": 4, "metrics": {"PQ": 20.0}}
    assert _evaluation_of("best", [{"step": 1, "eval": {"mIoU": 5.0}}, {"step": 2, "eval": {"mIoU": 7.0}}])["step"] == 2


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "me/bad name", "me/-dash", "me/x..y", "/x", ""])
def test_bad_repo_ids_are_refused(repo_id):
    with pytest.raises(PublishError, match="REPO_ID"):
        check_repo_id(repo_id)


def test_push_refusals_are_one_line(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no cached login
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["push", str(empty), "me/model"], "RUN_DIR '%s' holds no model: expected best/ or final/" % empty),
        (["push", str(tmp_path / "missing"), "me/model"], "is not a folder"),
        (["push", str(run_dir), "me/bad name"], "REPO_ID 'me/bad name' is not a valid hub repository id"),
        (["push", str(run_dir), "model"], "REPO_ID 'model' must be NAMESPACE/NAME"),
        (["push", str(run_dir), "me/model"], "no Hugging Face token: log in with `hf auth login`"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(PublishError, match="holds no model"):
        read_run(empty)


def test_push_reports_a_refused_upload(run_dir, tmp_path):
    with HubStandIn() as hub:
        proc = subprocess.run([sys.executable, "-m", "maskformers", "push", str(run_dir), "me/model", "--token",
                               "hf_wrong"], env=_env(hub, tmp_path), capture_output=True, text=True, timeout=300)
        assert hub.files == {}
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"maskformers push: the upload to me/model at {hub.url} failed:")
    assert "401" in lines[0] and "Traceback" not in proc.stderr
