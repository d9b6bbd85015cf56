"""Tests of maskformers.ops.build and maskformers.info: locating toolchains and sources, cache keys,
clear errors, the CUDA extension compiling and importing, and the sources shipping in a wheel."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from toolchain_helpers import cuda_build_skip_reason

from maskformers import info
from maskformers.ops import build, toolchain

REPO = Path(__file__).resolve().parent.parent
SOURCE_FILES = ("ms_deform_attn_math.h", "ms_deform_attn_checks.h", "ms_deform_attn_cpu.cpp",
                "ms_deform_attn_cuda.cu", "ms_deform_attn_cuda_bind.cpp")


@pytest.fixture
def fresh_build_state(monkeypatch):
    """Empty per-process caches of load_extension for the duration of a test."""
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_failed", {})


def write_executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_toolkit(root: Path, gpu_codes=("sm_80", "sm_90")) -> Path:
    """A folder that looks like a CUDA toolkit: bin/nvcc (answers --version, --list-gpu-code, -dryrun)
    and lib64/libcudart.so."""
    script = f"""#!/bin/sh
case "$1" in
  --version) echo "Cuda compilation tools, release {torch.version.cuda or '12.0'}, V0" ;;
  --list-gpu-code) printf '%s\\n' {' '.join(gpu_codes)} ;;
  -dryrun) echo "#$ _HERE_={root}/bin" >&2 ;;
esac
"""
    write_executable(root / "bin" / "nvcc", script)
    (root / "lib64").mkdir(parents=True, exist_ok=True)
    (root / "lib64" / "libcudart.so").write_bytes(b"")
    return root


def isolate_path(monkeypatch, *folders: Path) -> None:
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", os.pathsep.join([*(str(f) for f in folders), "/usr/bin", "/bin"]))


# ----------------------------------------------------------------------------------------------
# clear errors
# ----------------------------------------------------------------------------------------------


def test_unknown_device_type_is_explained(fresh_build_state):
    with pytest.raises(build.NativeOpUnavailable, match="no native ms_deform_attn kernel for device type 'mps'"):
        build.load_extension("mps")


def test_device_type_must_be_a_string():
    with pytest.raises(TypeError, match="device_type must be a str"):
        build.load_extension(torch.device("cpu"))


def test_missing_compiler_is_explained(monkeypatch, fresh_build_state):
    monkeypatch.setenv("CXX", "no-such-compiler-for-maskformers")
    with pytest.raises(build.NativeOpUnavailable, match="no C\\+\\+ compiler: 'no-such-compiler-for-maskformers'"):
        build.load_extension("cpu")
    # the failure is remembered: a second call does not retry
    monkeypatch.delenv("CXX")
    with pytest.raises(build.NativeOpUnavailable, match="no C\\+\\+ compiler"):
        build.load_extension("cpu")


def test_missing_ninja_is_explained(monkeypatch):
    monkeypatch.setattr(toolchain, "ninja_path", lambda: None)
    with pytest.raises(build.NativeOpUnavailable, match="ninja"):
        build.build_plan("cpu")


def test_cpu_only_torch_is_explained(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(build.NativeOpUnavailable, match="is a CPU-only build"):
        build.build_plan("cuda")


@pytest.mark.skipif(not torch.version.cuda, reason="torch is a CPU-only build")
def test_bad_cuda_home_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(build.NativeOpUnavailable, match="CUDA_HOME=.*nowhere has no bin/nvcc"):
        build.build_plan("cuda")


@pytest.mark.skipif(not torch.version.cuda, reason="torch is a CPU-only build")
def test_no_toolkit_is_explained(monkeypatch, tmp_path):
    isolate_path(monkeypatch, tmp_path)
    monkeypatch.setattr(toolchain, "_is_toolkit_root", lambda path: False)
    with pytest.raises(build.NativeOpUnavailable, match="no CUDA toolkit found \\(set CUDA_HOME"):
        build.build_plan("cuda")


@pytest.mark.skipif(not torch.version.cuda, reason="torch is a CPU-only build")
def test_nvcc_major_version_mismatch_is_explained(monkeypatch, tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    monkeypatch.setattr(toolchain, "nvcc_version", lambda root: "9.2")
    with pytest.raises(build.NativeOpUnavailable, match=f"nvcc 9.2 in .* does not match the CUDA {torch.version.cuda}"):
        build.build_plan("cuda")


def test_compile_error_reports_the_log_tail(monkeypatch, tmp_path, fresh_build_state, capsys):
    sources = tmp_path / "src"
    sources.mkdir()
    for name in SOURCE_FILES:
        shutil.copy(build.source_dir() / name, sources / name)
    broken = sources / "ms_deform_attn_cpu.cpp"
    broken.write_text('#include "deliberately_missing_header_for_the_test.h"\n' + broken.read_text())
    monkeypatch.setattr(build, "source_dir", lambda: sources)
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))

    with pytest.raises(build.NativeOpUnavailable) as failure:
        build.load_extension("cpu")
    message = str(failure.value)
    assert "compiling the ms_deform_attn CPU kernel failed" in message
    assert "deliberately_missing_header_for_the_test.h" in message
    log = next((tmp_path / "cache").glob("ms_deform_attn-cpu-*/build.log"))
    assert "deliberately_missing_header_for_the_test.h" in log.read_text()
    assert "compiling the native ms_deform_attn CPU kernel (first use, cached at" in capsys.readouterr().err
    with pytest.raises(build.NativeOpUnavailable) as again:  # remembered, not rebuilt
        build.load_extension("cpu")
    assert again.value is failure.value


# ----------------------------------------------------------------------------------------------
# toolkit discovery and architectures
# ----------------------------------------------------------------------------------------------


def test_cuda_home_env_is_respected(monkeypatch, tmp_path):
    on_path = fake_toolkit(tmp_path / "on_path")
    chosen = fake_toolkit(tmp_path / "chosen")
    isolate_path(monkeypatch, on_path / "bin")
    monkeypatch.setenv("CUDA_HOME", str(chosen))
    root, how = toolchain.find_cuda_home()
    assert root == chosen and how == f"CUDA_HOME={chosen}"


def test_cuda_home_behind_a_symlinked_nvcc(monkeypatch, tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda-x")
    links = tmp_path / "links"
    links.mkdir()
    (links / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    isolate_path(monkeypatch, links)
    root, how = toolchain.find_cuda_home()
    assert root == toolkit and "nvcc on PATH" in how


def test_cuda_home_behind_a_wrapper_script(monkeypatch, tmp_path):
    # like /usr/local/bin/nvcc here: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
    toolkit = fake_toolkit(tmp_path / "cuda-13.9")
    wrappers = tmp_path / "wrappers"
    write_executable(wrappers / "nvcc", f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    isolate_path(monkeypatch, wrappers)
    root, how = toolchain.find_cuda_home()
    assert root == toolkit and str(wrappers / "nvcc") in how


def test_cuda_home_behind_an_opaque_wrapper(monkeypatch, tmp_path):
    # the wrapper names no path; the dry run of the real driver tells where it lives
    toolkit = fake_toolkit(tmp_path / "cuda-hidden")
    (tmp_path / "where").write_text(str(toolkit / "bin" / "nvcc"))
    wrappers = tmp_path / "wrappers"
    write_executable(wrappers / "nvcc", f'#!/bin/sh\nexec "$(cat {tmp_path / "where"})" "$@"\n')
    isolate_path(monkeypatch, wrappers)
    root, _ = toolchain.find_cuda_home()
    assert root == toolkit


def test_arch_flags_default_and_env(monkeypatch, tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda", gpu_codes=("sm_80", "sm_90"))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90"])
    flags, desc = toolchain.cuda_arch_flags(toolkit)  # torch's architectures this nvcc supports, PTX of the newest
    assert flags == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    assert "8.0;9.0+PTX" in desc

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    flags, desc = toolchain.cuda_arch_flags(toolkit)  # the visible GPU's architecture
    assert flags == ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]
    assert desc.startswith("visible GPUs")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (8, 6))
    flags, _ = toolchain.cuda_arch_flags(toolkit)  # no sm_86 in this nvcc: the nearest older target
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_80,code=compute_80"]

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.9")
    assert toolchain.cuda_arch_flags(toolkit) == ([], "TORCH_CUDA_ARCH_LIST=8.9")


# ----------------------------------------------------------------------------------------------
# cache keys and sources
# ----------------------------------------------------------------------------------------------


def test_cache_key_follows_sources_and_root(monkeypatch, tmp_path):
    sources = tmp_path / "src"
    sources.mkdir()
    for name in SOURCE_FILES:
        shutil.copy(build.source_dir() / name, sources / name)
    monkeypatch.setattr(build, "source_dir", lambda: sources)
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
    first = build.build_plan("cpu")
    assert first.directory.parent == tmp_path / "cache"
    assert torch.__version__.replace("+", "_") in first.directory.name
    assert build.build_plan("cpu").directory == first.directory  # stable
    header = sources / "ms_deform_attn_math.h"
    header.write_text(header.read_text() + "\n// edited\n")
    second = build.build_plan("cpu")
    assert second.directory != first.directory and second.name != first.name
    assert not build.is_built(second)


def test_cpu_flags_are_optimized_and_parallel():
    plan = build.build_plan("cpu")
    assert "-O3" in plan.cflags
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        assert "-fopenmp" in plan.cflags and "-fopenmp" in plan.ldflags


def test_checkout_sources_are_found():
    assert build.source_dir() == (REPO / "csrc").resolve()


def test_wheel_ships_the_sources(tmp_path):
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.so")
    for name in ("maskformers", "weights_convert", "csrc"):
        shutil.copytree(REPO / name, tree / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, tree / name)
    wheels = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
        cwd=tree, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = wheels.glob("maskformers-*.whl")
    unzipped = tmp_path / "unzipped"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(unzipped)
    for name in {name for spec in build.OPS.values() for name in spec.files()}:
        shipped = unzipped / "maskformers" / "ops" / "_csrc" / name
        assert shipped.read_bytes() == (REPO / "csrc" / name).read_bytes(), name

    probe = "import maskformers, maskformers.ops.build as b; print(maskformers.__file__); print(b.source_dir())"
    env = {**os.environ, "PYTHONPATH": str(unzipped)}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    package_file, found = proc.stdout.split()
    assert Path(package_file).is_relative_to(unzipped)
    assert Path(found) == (unzipped / "maskformers" / "ops" / "_csrc").resolve()


# ----------------------------------------------------------------------------------------------
# the extensions themselves and the command lines
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(bool(cuda_build_skip_reason()), reason=cuda_build_skip_reason() or "ok")
def test_cuda_extension_compiles_and_imports(monkeypatch, fresh_build_state):
    root, how = toolchain.find_cuda_home()
    assert root is not None, f"nvcc is present but the CUDA toolkit was not found: {how}"
    supported = toolchain.nvcc_archs(root)
    arch = (8, 0) if (8, 0) in supported or not supported else supported[0]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", f"{arch[0]}.{arch[1]}")  # one architecture keeps CI short
    ext = build.load_extension("cuda")
    assert callable(ext.forward) and callable(ext.backward)
    # the argument checks run before any CUDA call, so they work without a GPU
    shapes = torch.tensor([[2, 3]])
    starts = torch.tensor([0])
    value = torch.randn(1, 6, 2, 4)
    loc, w = torch.rand(1, 5, 2, 1, 3, 2), torch.rand(1, 5, 2, 1, 3)
    with pytest.raises(RuntimeError, match="the cuda kernel needs value on cuda"):
        ext.forward(value, shapes, starts, loc, w)
    with pytest.raises(RuntimeError, match="the cuda kernel needs value on cuda"):
        ext.backward(value, shapes, starts, loc, w, torch.zeros(1, 5, 8))


def test_build_main_prebuilds_cpu(capsys):
    assert build.main(["--device", "cpu", "--op", "ms_deform_attn"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ms_deform_attn cpu: ready") and "-O3" in out


def info_sections(out: str) -> dict[str, dict[str, str]]:
    """{op: {device type: line}} from the kernel part of the info report."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("native ") and " kernels (cache: " in line:
            current = sections.setdefault(line.split()[1], {})
        elif line.startswith("  ") and current is not None:
            current[line.split(":")[0].strip()] = line
    return sections


def test_info_reports_without_compiling(monkeypatch, capsys):
    def no_compile(plan, **kwargs):
        raise AssertionError("maskformers.info must not compile without --build")

    monkeypatch.setattr(build, "_compile", no_compile)
    assert info.main([]) == 0
    out = capsys.readouterr().out
    for word in ("python", "torch", "c++ compiler", "nvcc", "ninja", "timm"):
        assert f"\n{word}" in "\n" + out, word
    sections = info_sections(out)
    assert set(sections) == set(build.OPS)
    states = (": available, built: cached at", ": available, not built yet", ": unavailable: ",
              ": compiles but cannot run here (no GPU visible), ")
    for lines in sections.values():
        assert set(lines) == {"cpu", "cuda"}
        for line in lines.values():
            assert any(state in line for state in states), line
        if not torch.cuda.is_available():
            assert ": available" not in lines["cuda"], lines["cuda"]
