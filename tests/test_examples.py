"""The example notebooks (maskformers/examples/, jupytext percent scripts) run end to end, as a user runs them
(``python -m maskformers.examples.NAME``), offline: the built-in model, a small OneFormer in the hub's layout,
small generated data and a few steps (the environment variables each example reads)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from oneformer_helpers import write_tiny_oneformer_checkpoint

EXAMPLES = Path(__file__).resolve().parents[1] / "maskformers" / "examples"


def run_example(name: str, env: dict[str, str], cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", f"maskformers.examples.{name}"], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "2", **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("name", ["inference", "finetune_custom_data"])
def test_examples_are_jupytext_percent_notebooks(name):
    text = (EXAMPLES / f"{name}.py").read_text()
    assert text.startswith("# ---\n# jupyter:\n#   jupytext:") and "format_name: percent" in text.split("# ---")[1]
    cells = re.findall(r"^# %%( \[markdown\])?$", text, flags=re.M)
    assert len(cells) >= 8 and cells[0] == " [markdown]"  # a title cell first, prose between the code


def test_inference_example(tmp_path):
    oneformer = write_tiny_oneformer_checkpoint(tmp_path / "tiny-oneformer")
    out = tmp_path / "outputs"
    stdout = run_example("inference", {"MASKFORMERS_EXAMPLE_MASK2FORMER": "builtin",
                                       "MASKFORMERS_EXAMPLE_ONEFORMER": str(oneformer),
                                       "MASKFORMERS_EXAMPLE_OUT": str(out)}, tmp_path)
    names = {p.name for p in out.iterdir()}
    assert names == {"image.png", "mask2former_panoptic.png", "mask2former_semantic.png", "mask2former_instance.png",
                     "oneformer_semantic.png", "oneformer_instance.png", "oneformer_panoptic.png"}
    # the built-in model finds the scene's two stuff regions (water, sand) and its shapes
    panoptic = stdout.split("mask2former_panoptic.png")[0]
    assert re.search(r"id +\d+ +0\.\d\d +water", panoptic) and re.search(r"id +\d+ +0\.\d\d +sand", panoptic)
    assert re.search(r"id +\d+ +0\.\d\d +(circle|square|triangle)", panoptic)
    instance = stdout.split("mask2former_semantic.png")[1].split("mask2former_instance.png")[0]
    assert "water" not in instance and "sand" not in instance  # things only
    for task in ("semantic", "instance", "panoptic"):
        assert f"OneFormer, {task}:" in stdout


def test_finetune_example(tmp_path):
    work = tmp_path / "work"
    stdout = run_example("finetune_custom_data", {"MASKFORMERS_EXAMPLE_STEPS": "2", "MASKFORMERS_EXAMPLE_IMAGES": "8",
                                                  "MASKFORMERS_EXAMPLE_OUT": str(work)}, tmp_path)
    for run in ("sem", "coco"):
        for folder in ("final", "best"):
            assert (work / "runs" / run / folder / "preprocessor_config.json").is_file()
        assert (work / "runs" / run / "run_config.json").is_file()
    assert len(list((work / "check-data").glob("*.png"))) == 2
    assert re.search(r"semantic folder, after fine-tuning: mIoU \d+\.\d", stdout)
    assert re.search(r"COCO panoptic: PQ \d+\.\d before, \d+\.\d after", stdout)
    assert "size_divisibility=32 has no transformers equivalent" in stdout
    assert {p.name for p in (work / "exported-to-transformers").iterdir()} == {
        "config.json", "model.safetensors", "preprocessor_config.json"}
    difference = float(re.search(r"class logits: max difference (\S+)", stdout).group(1))
    assert difference < 1e-4  # float32, same weights and inputs
