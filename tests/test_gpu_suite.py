"""benchmarks/gpu_suite.py, the one command for a GPU machine, kept from rotting: its CPU smoke mode runs
every section that does not need CUDA (tiny models and shapes), and a failing section is recorded and
skipped past, never fatal."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maskformers.ops import toolchain

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


@pytest.mark.skipif(toolchain.cxx_compiler() is None or toolchain.ninja_path() is None,
                    reason="no C++ compiler or ninja to build the native kernels")
def test_smoke_run_on_the_cpu(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "suite.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(SUITE), "--device", "cpu", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    statuses = {name: record["status"] for name, record in result["sections"].items()}
    assert statuses["no host sync"] == "skipped: needs CUDA"
    ran = [name for name, status in statuses.items() if not status.startswith("skipped")]
    assert ran == ["environment", "build", "correctness", "models 640 b1", "ops", "training", "postprocess"]
    assert all(statuses[name] == "ok" for name in ran), statuses
    rows = result["rows"]
    checks = [r for r in rows if r["section"] == "correctness"]
    assert all(r["ok"] for r in checks), checks
    assert len([r for r in checks if "variant" not in r["case"]]) == 10
    variants = {r["mode"] for r in checks if "variant" in r["case"]}  # every kernel variant in each of its dtypes
    assert {"tiled float32", "coalesced+tiled bfloat16", "tensor_core bfloat16",
            "tensor_core+tensor_core_bwd float16"} <= variants and len(variants) == 15
    modes = {(r["case"], r["mode"].split(" (")[0]) for r in rows if r["section"] == "model"}
    for kind in ("mask2former", "oneformer"):
        for mode in ("transformers bf16 autocast", "transformers bf16", "maskformers bf16 autocast",
                     "maskformers bf16", "maskformers bf16 compiled"):
            assert (f"{kind} 64x64 b1", mode) in modes
    assert {r["mode"] for r in rows if r["section"] == "training"} == {"transformers", "maskformers"}
    assert all(r["ms"] > 0 for r in rows if r["section"] in ("op", "training", "postprocess"))
    assert "| section | case | mode | ms |" in proc.stdout


def test_a_failing_section_is_recorded_and_the_suite_goes_on(tmp_path):
    sys.path.insert(0, str(SUITE.parent))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(SUITE.parent))
    args = argparse.Namespace(device="cpu", budget=100.0, out=tmp_path / "s.json", smoke=True, quick=False, repeats=1)
    suite = gpu_suite.Suite(args)

    def broken():
        raise RuntimeError("kernel exploded")

    suite.section("broken", broken)
    suite.section("fine", lambda: suite.row("x", "case", "mode", 1.0))
    suite.section("cuda only", lambda: None, cuda_only=True)
    suite.section("too long", lambda: None, needs_s=1e9)
    saved = json.loads(args.out.read_text())
    assert saved["sections"]["broken"]["status"] == "error"
    assert "RuntimeError: kernel exploded" in saved["sections"]["broken"]["error"]
    assert saved["sections"]["fine"]["status"] == "ok" and saved["rows"][0]["ms"] == 1.0
    assert saved["sections"]["cuda only"]["status"] == "skipped: needs CUDA"
    assert saved["sections"]["too long"]["status"].startswith("skipped:")
