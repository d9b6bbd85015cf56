"""The README's fine-tuning walkthrough runs as written: its commands are read from README.md (between the
walkthrough markers) and run on small datasets written to disk in the layouts it describes; only the step
counts are smaller (N -> N // 50)."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest
from finetune_helpers import write_coco_panoptic, write_id2label, write_semantic_folder

from maskformers import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def walkthrough_commands() -> list[list[str]]:
    """The walkthrough's commands: lines joined at trailing backslashes, comments and blank lines dropped."""
    text = README.read_text()
    block = text[text.index("<!-- walkthrough-start -->"):text.index("<!-- walkthrough-end -->")]
    body = block.split("```bash", 1)[1].rsplit("```", 1)[0]
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            commands.append(shlex.split(line))
    return commands


def _fewer_steps(argv: list[str]) -> list[str]:
    return [str(max(1, int(a) // 50)) if i and argv[i - 1] == "--steps" else a for i, a in enumerate(argv)]


def test_the_readme_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys):
    commands = walkthrough_commands()
    assert [c[:2] for c in commands] == [["maskformers", "train"], ["maskformers", "evaluate"],
                                         ["maskformers", "segment"], ["maskformers", "evaluate"],
                                         ["maskformers", "train"], ["maskformers", "train"],
                                         ["maskformers", "evaluate"], ["maskformers", "segment"]]
    monkeypatch.chdir(tmp_path)
    data = Path("data")
    for split, n, seed in (("train", 6, 7), ("val", 3, 8)):
        write_semantic_folder(data / "sem" / "images" / split, data / "sem" / "labels" / split, n=n, seed=seed)
        write_coco_panoptic(data / "coco" / f"{split}2017", data / "coco" / f"panoptic_{split}2017",
                            data / "coco" / f"panoptic_{split}2017.json", n=n, seed=seed + 10)
    write_id2label(data / "sem" / "id2label.json")

    for argv in commands:
        capsys.readouterr()
        rc = cli.main(_fewer_steps(argv[1:]) + (["--quiet"] if argv[1] in ("train", "segment") else []))
        assert rc == 0, (argv, capsys.readouterr().err)

    for run in ("runs/sem", "runs/coco"):
        for name in ("final", "best"):  # the saved folders load and segment (the segment commands used best/)
            assert {"model.safetensors", "maskformers_config.json", "preprocessor_config.json"} <= {
                p.name for p in Path(run, name).iterdir()}
    assert sorted(p.name for p in Path("runs/sem/segments").glob("*_segmentation.png")) == [
        f"scene-{i}_segmentation.png" for i in range(3)]
    assert len(list(Path("runs/coco/segments").glob("*_segments.json"))) == 3
    metrics = {name: json.loads(Path(path).read_text())["metrics"]
               for name, path in (("sem", "runs/sem/val.json"), ("before", "before.json"), ("after", "after.json"))}
    assert math.isfinite(metrics["sem"]["mIoU"]) and 0 <= metrics["sem"]["mIoU"] <= 100
    for name in ("before", "after"):
        assert math.isfinite(metrics[name]["PQ"]) and 0 <= metrics[name]["PQ"] <= 100
    config = json.loads(Path("runs/coco/run_config.json").read_text())
    assert config["training"]["max_steps"] == 3 and config["resumes"][-1]["changed"]["steps"] == {"was": 2, "now": 3}


@pytest.mark.parametrize("line", [line for line in README.read_text().splitlines()
                                  if line.startswith("maskformers train --resume")])
def test_readme_resume_lines_need_only_out(line):
    assert re.fullmatch(r"maskformers train --resume --out \S+( --steps \d+)?( +#.*)?", line.strip())
