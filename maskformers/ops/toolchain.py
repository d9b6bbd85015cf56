"""Toolchain discovery for the native kernel build: C++ compiler, ninja, CUDA toolkit, GPU architectures.

Plain functions that look things up and report; they raise nothing. ``build.py`` turns missing pieces
into ``NativeOpUnavailable`` errors, ``maskformers.info`` prints them.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

__all__ = [
    "cpu_build_flags",
    "cuda_arch_flags",
    "cxx_compiler",
    "find_cuda_home",
    "ninja_path",
    "nvcc_archs",
    "nvcc_version",
    "tool_version",
]


def cxx_compiler() -> str | None:
    """Path of the C++ compiler torch will use (``$CXX`` or ``c++``), None when it is not on PATH."""
    return shutil.which(os.environ.get("CXX", "c++"))


def ninja_path() -> str | None:
    """Path of the ``ninja`` command torch's extension builder runs, None when it is not on PATH."""
    return shutil.which("ninja")


def tool_version(cmd: list[str]) -> str:
    """First non-empty output line of a ``--version`` style command."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({exc})"
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return lines[0].strip() if lines else "unknown"


def _host_cpu_id() -> str:
    """Identity of the host CPU (model and feature flags) for the cache key of ``-march=native`` builds."""
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
        fields = [re.search(rf"^{key}\s*:\s*(.*)$", cpuinfo, re.M) for key in ("model name", "flags", "Features")]
        return platform.machine() + "|" + "|".join(m.group(1) for m in fields if m)
    except OSError:
        return f"{platform.machine()}|{platform.processor()}"


def cpu_build_flags() -> tuple[list[str], list[str], str]:
    """(compile flags, link flags, host CPU identity for the cache key; "" when the build is portable)."""
    cflags, ldflags, cpu_id = ["-O3"], [], ""
    if sys.platform.startswith("linux"):
        if torch.backends.openmp.is_available():  # at::parallel_for runs serially without -fopenmp
            cflags.append("-fopenmp")
            ldflags.append("-fopenmp")
        if platform.machine() in ("x86_64", "AMD64", "aarch64"):
            cflags.append("-march=native")
            cpu_id = _host_cpu_id()
    return cflags, ldflags, cpu_id


# ----------------------------------------------------------------------------------------------
# CUDA toolkit
# ----------------------------------------------------------------------------------------------


def _is_toolkit_root(path: Path) -> bool:
    if not (path / "bin" / "nvcc").is_file():
        return False
    lib_dirs = ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
    return any((path / d / "libcudart.so").exists() for d in lib_dirs)


def _toolkit_from_nvcc(nvcc: str) -> Path | None:
    """The toolkit root behind an nvcc on PATH, also when that nvcc is a symlink or a wrapper script."""
    real = Path(os.path.realpath(nvcc))
    if _is_toolkit_root(real.parent.parent):
        return real.parent.parent
    try:  # a small shell wrapper that execs the real nvcc: read the absolute paths it names
        if real.stat().st_size < 64 * 1024:
            for match in re.findall(r"(/[^\s'\"]+)/bin/nvcc\b", real.read_text(errors="ignore")):
                if _is_toolkit_root(Path(match)):
                    return Path(match)
    except OSError:
        pass
    try:  # whatever the wrapper does, the real driver prints its own folder in a dry run
        proc = subprocess.run(
            [nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
        match = re.search(r"_HERE_=(\S+)", proc.stdout + proc.stderr)
        if match and _is_toolkit_root(Path(match.group(1)).parent):
            return Path(match.group(1)).parent.resolve()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def find_cuda_home() -> tuple[Path | None, str]:
    """(toolkit root, how it was found) or (None, why not).

    ``CUDA_HOME`` (or ``CUDA_PATH``) wins when set; then the nvcc on PATH, followed through symlinks and
    wrapper scripts to the folder holding bin/nvcc and lib64/libcudart.so; then common locations.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            path = Path(value).expanduser()
            if (path / "bin" / "nvcc").is_file():
                return path, f"{var}={value}"
            return None, f"{var}={value} has no bin/nvcc"
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_from_nvcc(nvcc)
        if root is not None:
            return root, f"nvcc on PATH ({nvcc})"
    common = [f"/usr/local/cuda-{torch.version.cuda}" if torch.version.cuda else "", "/usr/local/cuda", "/opt/cuda",
              *sorted(glob.glob("/usr/local/cuda-*"))]
    common = list(dict.fromkeys(c for c in common if c))
    for candidate in common:
        if _is_toolkit_root(Path(candidate)):
            return Path(candidate), f"found at {candidate}"
    looked = f"nvcc on PATH: {nvcc or 'none'}; " + ", ".join(common)
    return None, f"no CUDA toolkit found (set CUDA_HOME to the folder with bin/nvcc; looked at {looked})"


def nvcc_version(cuda_home: Path) -> str:
    """Release of the nvcc in ``cuda_home`` as "major.minor", or "" when it cannot be read."""
    try:
        out = subprocess.run([str(cuda_home / "bin" / "nvcc"), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    match = re.search(r"release (\d+\.\d+)", out.stdout)
    return match.group(1) if match else ""


def nvcc_archs(cuda_home: Path) -> list[tuple[int, int]]:
    """Real architectures (sm_XY) this nvcc can compile for, sorted; empty when it cannot tell."""
    try:
        out = subprocess.run(
            [str(cuda_home / "bin" / "nvcc"), "--list-gpu-code"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({(int(m[:-1]), int(m[-1])) for m in re.findall(r"\bsm_(\d+)\b", out)})


def cuda_arch_flags(cuda_home: Path) -> tuple[list[str], str]:
    """(nvcc -gencode flags, description) for the CUDA build.

    ``TORCH_CUDA_ARCH_LIST`` when set (empty flags: torch parses the variable itself); else the visible
    GPUs' architectures; else, with no GPU, the architectures torch was built for. Restricted to what
    this nvcc supports, plus PTX of the newest so that newer GPUs can JIT-compile it.
    """
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return [], f"TORCH_CUDA_ARCH_LIST={env}"
    supported = nvcc_archs(cuda_home)
    caps = sorted({tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})
    if caps:
        source = "visible GPUs"
        if supported:  # a GPU this nvcc has no exact target for runs the nearest older SASS or the PTX
            caps = sorted({cap if cap in supported else max([s for s in supported if s <= cap] or supported[:1])
                           for cap in caps})
    else:
        caps = sorted({(int(a[3:-1]), int(a[-1])) for a in torch.cuda.get_arch_list() if re.fullmatch(r"sm_\d+", a)})
        source = "no GPU visible: the architectures torch was built for"
        if supported:
            caps = [cap for cap in caps if cap in supported] or supported[-1:]
    if not caps:
        caps, source = [(7, 5), (8, 0), (8, 6), (9, 0)], "built-in default"
    flags = [f"-gencode=arch=compute_{ma}{mi},code=sm_{ma}{mi}" for ma, mi in caps]
    ma, mi = caps[-1]
    flags.append(f"-gencode=arch=compute_{ma}{mi},code=compute_{ma}{mi}")
    return flags, f"{source}: {';'.join(f'{a}.{b}' for a, b in caps)}+PTX"
