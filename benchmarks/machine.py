"""What the benchmark ran on, how fast its memory is, and (on Jetson) how much power it drew."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from runtime.jetson import parse_tegrastats


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ISA features that change which kernels ONNX Runtime, MLAS and PyTorch run (x86 flags, ARM
# Features), as /proc/cpuinfo names them.
ISA_FEATURES = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "i8mm",
    "bf16",
    "sve",
    "sve2",
)
CPUINFO_FIELDS = {
    "vendor_id": "vendor",
    "CPU implementer": "vendor",
    "cpu family": "family",
    "CPU architecture": "family",
    "model": "model",
    "CPU part": "model",
    "stepping": "stepping",
    "CPU variant": "stepping",
}


def cpu_identity(cpuinfo: str | None = None, cache_root: Path | None = None) -> dict:
    """Vendor, family/model/stepping, the ISA features of ``ISA_FEATURES`` it has, and cache
    sizes: what tells two CPUs with the same marketing name apart for kernel speed."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    first = cpuinfo.split("\n\n")[0]
    out: dict = {"model_name": None, "features": []}
    for line in first.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in CPUINFO_FIELDS:
            out.setdefault(CPUINFO_FIELDS[key], value)
        elif key == "model name":
            out["model_name"] = value
        elif key in ("flags", "Features"):
            have = set(value.split())
            out["features"] = [f for f in ISA_FEATURES if f in have]
    out["caches"] = cache_sizes(cache_root or Path("/sys/devices/system/cpu/cpu0/cache"))
    return out


def cache_sizes(root: Path) -> dict[str, str]:
    """``{"L1d": "48K", "L2": "1024K", ...}`` of one core, from sysfs (empty where absent)."""
    sizes = {}
    for index in sorted(root.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        sizes[f"L{level}{suffix}"] = size
    return sizes


def same_machine(a: dict, b: dict) -> bool:
    """Whether two results' machines are the same kind of CPU (identity, cores, features)."""
    keys = ("vendor", "family", "model", "stepping", "model_name", "features")
    ida, idb = a.get("cpu_identity") or {}, b.get("cpu_identity") or {}
    if not ida or not idb:  # an older result: the marketing name is all there is
        return a.get("cpu") == b.get("cpu") and a.get("cores") == b.get("cores")
    same = all(ida.get(k) == idb.get(k) for k in keys)
    return same and a.get("cores") == b.get("cores")


def memory_bytes() -> int:
    """Physical memory of this machine."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def machine_info() -> dict:
    info = {
        "cpu": cpu_model(),
        "cpu_identity": cpu_identity(),
        "cores": os.cpu_count(),
        "memory_gb": round(memory_bytes() / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            p: _version(p)
            for p in (
                "torch",
                "onnxruntime",
                "onnxruntime-gpu",
                "tensorrt",
                "transformers",
                "numpy",
            )
        },
        "gpu": None,
        "jetson": None,
    }
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        info["gpu"] = out.stdout.strip() or None
    tegra = Path("/etc/nv_tegra_release")
    if tegra.is_file():
        info["jetson"] = {"l4t": tegra.read_text().splitlines()[0].strip()}
        if shutil.which("nvpmodel"):
            q = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True)
            info["jetson"]["power_mode"] = q.stdout.strip()
    return info


def measure_bandwidth(
    nbytes: int = 512 << 20, repeats: int = 5, threads: int | None = None
) -> dict[str, float]:
    """Host memory bandwidth in bytes/s, two ways, best of ``repeats``: a large array copy
    (read + write, one thread) and a matrix-vector product in ONNX Runtime with the benchmark's
    intra-op ``threads`` (read only: the access pattern and thread count of a decode step, so the
    roofline compares like with like). ``best`` is the higher, so roofline ratios are
    conservative."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    copy = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        copy = min(copy, time.perf_counter() - t0)
    del src, dst
    out = {"copy": 2 * nbytes / copy, "gemv_read": _gemv_read(nbytes, repeats, threads)}
    out["best"] = max(out.values())
    return out


def _gemv_read(nbytes: int, repeats: int, threads: int | None) -> float:
    from onnx import TensorProto, helper, numpy_helper

    from runtime import onnx_io

    rows = 4096
    weight = np.ones((rows, nbytes // 4 // rows), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = onnx_io.make_model(graph, [helper.make_opsetid("", 18)])
    session = onnx_io.session(model, threads)
    del model, graph
    x = {"x": np.ones((1, rows), dtype=np.float32)}
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        t0 = time.perf_counter()
        session.run(None, x)
        best = min(best, time.perf_counter() - t0)
    return weight.nbytes / best


# glibc's mmap threshold moves with what a process has allocated and freed before, and the heap's
# top is handed back to the kernel once 2x that is free: the same preprocess call then took 1.5k
# page faults in one column process and 4.4k in another (29 vs 33 ms). Fixed thresholds keep freed
# buffers for reuse, as in a long-running server, so a column's figures do not depend on its past.
STEADY_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(256 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(2**30),
}


@contextlib.contextmanager
def steady_allocator():
    """Environment for processes started inside the block: ``STEADY_MALLOC_ENV``, except where
    the user set a variable already (theirs wins); this process's own environment after it."""
    saved = {k: os.environ.get(k) for k in STEADY_MALLOC_ENV}
    for k, v in STEADY_MALLOC_ENV.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class TegraStats:
    """Samples ``tegrastats`` while a block runs: board power (the module's rails, summed as
    ``runtime.jetson`` knows them for each Orin), GR3D and EMC use. tegrastats writes to a log
    file (``--logfile``: no pipe buffering) read back at the end."""

    def __init__(self, interval_ms: int = 100) -> None:
        self.interval_ms = interval_ms
        self.samples: list[str] = []
        self.available = Path("/etc/nv_tegra_release").is_file() and shutil.which("tegrastats")

    def __enter__(self):
        if self.available:
            import tempfile

            self.log = Path(tempfile.mkstemp(prefix="fila-tegrastats-", suffix=".log")[1])
            cmd = ["tegrastats", "--interval", str(self.interval_ms), "--logfile", str(self.log)]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        if self.available:
            self.proc.terminate()
            self.proc.wait(timeout=5)
            self.samples = [s for s in self.log.read_text().splitlines() if s.strip()]
            self.log.unlink(missing_ok=True)

    def summary(self, tokens: int | None = None) -> dict | None:
        if not self.available or not self.samples:
            return None
        return power_summary(self.samples, self.seconds, tokens)


def power_summary(lines: list[str], seconds: float, tokens: int | None = None) -> dict:
    """Average board power, GR3D and EMC over tegrastats lines, and the energy over ``seconds``
    (per token when ``tokens`` is given). A line without known rails raises."""
    samples = [parse_tegrastats(line) for line in lines]

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    power_w = mean(s.board_mw for s in samples) / 1000
    out = {
        "avg_power_w": power_w,
        "gr3d_pct": mean(s.gr3d_pct for s in samples),
        "emc_pct": mean(s.emc_pct for s in samples),
        "seconds": seconds,
        "joules": power_w * seconds,
        "tokens": tokens or 0,
        "module": samples[0].module,
    }
    if tokens:
        out["joules_per_token"] = out["joules"] / tokens
    return out


def merge_power(parts: list[dict | None]) -> dict | None:
    """One column's power over all its rounds (``TegraStats.summary`` of each): energy and tokens
    add up; power and utilisation are averaged over time."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    seconds = sum(p["seconds"] for p in parts)

    def over_time(key: str) -> float | None:
        timed = [(p[key], p["seconds"]) for p in parts if p.get(key) is not None]
        return sum(v * t for v, t in timed) / sum(t for _, t in timed) if timed else None

    joules, tokens = sum(p["joules"] for p in parts), sum(p["tokens"] for p in parts)
    out = {
        "avg_power_w": joules / seconds,
        "gr3d_pct": over_time("gr3d_pct"),
        "emc_pct": over_time("emc_pct"),
        "seconds": seconds,
        "joules": joules,
        "tokens": tokens,
    }
    if tokens:
        out["joules_per_token"] = joules / tokens
    return out
