"""``fila doctor``: what is wrong with the machine the runtime is about to run on, and the fix.

Facts are gathered once (files and commands a Jetson or a PC offers, each best-effort) into a
``Facts`` record, so the checks are plain functions of it and tests feed them recorded facts of
a JetPack 6 Orin Nano, an AGX Orin and a machine without a GPU.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from runtime.jetson import PowerError, l4t_release, parse_tegrastats

# What each JetPack ships (NVIDIA's release notes): CUDA and TensorRT by L4T major.minor.
STACKS = {
    # TensorRT 8.6 has no strong typing: fila build gives it FP16/INT8 builder flags instead
    "36.3": {"jetpack": "6.0", "cuda": "12.2", "tensorrt": "8.6"},
    "36.4": {"jetpack": "6.1/6.2", "cuda": "12.6", "tensorrt": "10.3"},
    "38.2": {"jetpack": "7.0", "cuda": "13.0", "tensorrt": "10.13"},
}
JETSON_ORT = "NVIDIA's Jetson wheel index (https://pypi.jetson-ai-lab.io, the jp6/cu126 index)"


@dataclass
class Facts:
    machine: str = ""
    tegra_release: str | None = None  # /etc/nv_tegra_release
    nvpmodel: str | None = None  # nvpmodel -q
    tegrastats: str | None = None  # one line
    cuda_version: str | None = None  # /usr/local/cuda/version.json, or nvidia-smi's
    gpu: str | None = None  # nvidia-smi's name (a PC)
    meminfo: str = ""  # /proc/meminfo
    packages: dict[str, str] = field(default_factory=dict)  # distribution -> version
    tensorrt: str | None = None  # import tensorrt: __version__, or None
    ort_providers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Finding:
    level: str  # ok, warn, error
    topic: str
    message: str
    fix: str = ""

    def line(self) -> str:
        mark = {"ok": "ok   ", "warn": "WARN ", "error": "ERROR"}[self.level]
        fix = f"\n      fix: {self.fix}" if self.fix else ""
        return f"{mark} {self.topic}: {self.message}{fix}"


def gather() -> Facts:
    """This machine's facts (nothing here fails: a missing tool is a missing fact)."""
    facts = Facts(machine=platform.machine())
    release = Path("/etc/nv_tegra_release")
    facts.tegra_release = release.read_text() if release.is_file() else None
    facts.nvpmodel = _run(["nvpmodel", "-q"])
    facts.tegrastats = _first_tegrastats_line()
    facts.cuda_version = _cuda_version()
    facts.gpu = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    meminfo = Path("/proc/meminfo")
    facts.meminfo = meminfo.read_text() if meminfo.is_file() else ""
    for name in ("numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "cuda-python", "torch"):
        try:
            facts.packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        import tensorrt

        facts.tensorrt = tensorrt.__version__
    except ImportError:
        facts.tensorrt = None
    try:
        import onnxruntime

        facts.ort_providers = list(onnxruntime.get_available_providers())
    except ImportError:
        facts.ort_providers = []
    return facts


def _run(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    return done.stdout.strip() or None if done.returncode == 0 else None


def _first_tegrastats_line() -> str | None:
    if not shutil.which("tegrastats"):
        return None
    try:
        proc = subprocess.Popen(
            ["tegrastats", "--interval", "100"], stdout=subprocess.PIPE, text=True
        )
        line = proc.stdout.readline()
        proc.terminate()
        return line.strip() or None
    except OSError:
        return None


def _cuda_version() -> str | None:
    version = Path("/usr/local/cuda/version.json")
    if version.is_file():
        match = re.search(
            r'"cuda"\s*:\s*\{\s*"name"[^}]*"version"\s*:\s*"([\d.]+)"', version.read_text()
        )
        if match:
            return match.group(1)
    smi = _run(["nvidia-smi"])
    match = re.search(r"CUDA Version:\s*([\d.]+)", smi or "")
    return match.group(1) if match else None


def diagnose(facts: Facts, trt_tables: tuple[str, ...] = ()) -> list[Finding]:
    """Every check, in the order an engineer meets the problems (``trt_tables``: the TensorRT
    versions ``fila check-trt`` has operator tables for)."""
    jetson = l4t_release(facts.tegra_release) if facts.tegra_release else None
    stack = STACKS.get(jetson.version) if jetson else None
    found = [platform_finding(facts, jetson, stack)]
    found += python_packages(facts, jetson)
    found += cuda_findings(facts, stack)
    found += tensorrt_findings(facts, jetson, stack, trt_tables)
    found += onnxruntime_findings(facts, jetson)
    if jetson:
        found += board_findings(facts)
    found += memory_findings(facts, jetson)
    return found


def platform_finding(facts: Facts, jetson, stack) -> Finding:
    if jetson is None:
        where = f"GPU {facts.gpu}" if facts.gpu else "no NVIDIA GPU (CPU only: ONNX Runtime's CPU)"
        return Finding("ok", "platform", f"{facts.machine}, not a Jetson; {where}")
    if stack is None:
        return Finding(
            "warn",
            "platform",
            f"L4T R{jetson.version} is not a release this toolkit was checked against",
            "use JetPack 6.1/6.2 (L4T R36.4) or 7.0 (R38.2)",
        )
    return Finding("ok", "platform", f"Jetson, L4T R{jetson.version} = JetPack {stack['jetpack']}")


def python_packages(facts: Facts, jetson) -> list[Finding]:
    out = []
    numpy = facts.packages.get("numpy")
    if jetson and jetson.major == 36 and numpy and int(numpy.split(".")[0]) >= 2:
        out.append(
            Finding(
                "error",
                "numpy",
                f"numpy {numpy}: JetPack 6's onnxruntime-gpu and torch wheels are built against "
                "numpy 1.x and fail to import with 2.x",
                "pip install 'numpy<2' (pip install -c constraints/jetpack6.txt pins it)",
            )
        )
    if "onnx" not in facts.packages:
        fix = "pip install onnx (the board extra installs it)"
        out.append(Finding("warn", "onnx", "onnx is missing: check-trt and bench need it", fix))
    return out


def cuda_findings(facts: Facts, stack) -> list[Finding]:
    cuda_python = facts.packages.get("cuda-python")
    cuda = facts.cuda_version or (stack["cuda"] if stack else None)
    if not cuda_python or not cuda:
        return []
    major, minor = (int(x) for x in (cuda.split(".") + ["0"])[:2])
    have = tuple(int(x) for x in re.findall(r"\d+", cuda_python)[:2])
    if have[0] != major or have[1] > minor:
        why = "another major version" if have[0] != major else "newer than the board's CUDA"
        return [
            Finding(
                "error",
                "cuda-python",
                f"cuda-python {cuda_python} is {why} ({cuda}): its runtime bindings ask a driver "
                "of their own version, so the TensorRT runner's first CUDA call fails",
                f"pip install 'cuda-python>={major}.{minor},<{major}.{minor + 1}'",
            )
        ]
    return [Finding("ok", "cuda-python", f"{cuda_python} for CUDA {cuda}")]


def tensorrt_findings(facts: Facts, jetson, stack, tables: tuple[str, ...]) -> list[Finding]:
    if facts.tensorrt is None:
        if jetson is None:
            note = "not installed: fila build and --backend tensorrt are unavailable here"
            return [Finding("ok", "tensorrt", note)]
        return [
            Finding(
                "error",
                "tensorrt",
                "TensorRT's Python bindings do not import (JetPack installs them system-wide: a "
                "venv without system site packages cannot see them)",
                "sudo apt install python3-libnvinfer; python3 -m venv --system-site-packages .venv",
            )
        ]
    version = ".".join(facts.tensorrt.split(".")[:2])
    out = []
    if stack and not version.startswith(stack["tensorrt"]):
        note = f"TensorRT {facts.tensorrt}; JetPack {stack['jetpack']} ships {stack['tensorrt']}"
        out.append(Finding("warn", "tensorrt", note, "use the JetPack's own TensorRT"))
    if tables and version not in tables and f"{version.split('.')[0]}.x" not in tables:
        fix = f"check with fila check-trt --trt-version {tables[-1]}"
        out.append(Finding("warn", "tensorrt", f"fila check-trt has no table for {version}", fix))
    return out or [Finding("ok", "tensorrt", f"TensorRT {facts.tensorrt}")]


def onnxruntime_findings(facts: Facts, jetson) -> list[Finding]:
    cpu = "onnxruntime" in facts.packages
    gpu = "onnxruntime-gpu" in facts.packages
    if not cpu and not gpu:
        fix = (
            f"pip install onnxruntime-gpu from {JETSON_ORT}"
            if jetson
            else "pip install onnxruntime"
        )
        return [Finding("error", "onnxruntime", "ONNX Runtime is not installed", fix)]
    if cpu and gpu:
        return [
            Finding(
                "error",
                "onnxruntime",
                "both onnxruntime (PyPI, CPU) and onnxruntime-gpu are installed: the CPU one hides "
                "the CUDA provider",
                "pip uninstall -y onnxruntime onnxruntime-gpu; reinstall onnxruntime-gpu alone",
            )
        ]
    if jetson and "CUDAExecutionProvider" not in facts.ort_providers:
        return [
            Finding(
                "error",
                "onnxruntime",
                f"no CUDA provider (providers: {', '.join(facts.ort_providers) or 'none'}): this "
                "is PyPI's CPU build",
                f"pip uninstall -y onnxruntime; pip install onnxruntime-gpu from {JETSON_ORT}",
            )
        ]
    providers = ", ".join(p.removesuffix("ExecutionProvider") for p in facts.ort_providers)
    return [Finding("ok", "onnxruntime", f"providers {providers}")]


def board_findings(facts: Facts) -> list[Finding]:
    out = []
    mode = re.search(r"NV Power Mode:\s*(\S+)", facts.nvpmodel or "")
    if mode is None:
        out.append(Finding("warn", "power mode", "nvpmodel -q did not answer", "sudo nvpmodel -q"))
    elif "MAXN" not in mode.group(1).upper():
        fix = "for benchmarks: sudo nvpmodel -m 0 && sudo jetson_clocks (fixed, highest clocks)"
        out.append(Finding("warn", "power mode", f"{mode.group(1)} (not MAXN)", fix))
    else:
        out.append(Finding("ok", "power mode", mode.group(1)))
    if facts.tegrastats is None:
        out.append(Finding("warn", "power rails", "tegrastats gave no line", "run it with sudo"))
        return out
    try:
        sample = parse_tegrastats(facts.tegrastats)
    except PowerError as exc:
        out.append(Finding("error", "power rails", str(exc), "report the line with the module"))
        return out
    rails = " + ".join(sample.rails)
    note = f"{sample.module}: board power = {rails} = {sample.board_mw / 1000:.1f} W now"
    out.append(Finding("ok", "power rails", note))
    return out


def memory_findings(facts: Facts, jetson) -> list[Finding]:
    info = {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", facts.meminfo, re.MULTILINE)}
    if "MemTotal" not in info:
        return []
    total, free = info["MemTotal"] / 2**20, info.get("MemAvailable", 0) / 2**20
    swap = info.get("SwapTotal", 0) / 2**20
    note = f"{free:.1f} of {total:.1f} GB available, swap {swap:.1f} GB"
    if jetson and total < 10 and swap == 0:
        fix = "add swap (sudo systemctl enable nvzramconfig, or a swap file on NVMe)"
        return [Finding("warn", "memory", note + ": an 8 GB board without swap", fix)]
    if free < 2:
        fix = "stop other work or use fila plan to pick precision and context"
        return [Finding("warn", "memory", note, fix)]
    return [Finding("ok", "memory", note)]


def report(findings: list[Finding]) -> dict:
    return {
        "findings": [asdict(f) for f in findings],
        "errors": sum(f.level == "error" for f in findings),
    }
