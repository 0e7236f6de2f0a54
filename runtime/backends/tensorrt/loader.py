"""The TensorRT loader: the plan built for one (stage, variant) of an export, checked against this
machine (the TensorRT version and GPU it was built with, its source ONNX hash, the plan's own
hash) and deserialized when called."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from runtime.backends.tensorrt.device import describe, gpu_info, same_gpu
from runtime.errors import EngineMismatchError, FilaError
from runtime.manifest import Manifest, safe_path
from runtime.profiles import Profile, stage_profiles

ENGINE_DIR = "engines"
BUILD_INFO = "build_info.json"
REBUILD = "rebuild it on this machine: fila build --artifacts {art} --stages {stage}"


def check_build_info(
    info: dict,
    entry: dict,
    source_sha256: str,
    trt_version: str,
    gpu: dict | None,
    artifacts: Path,
    stage: str,
) -> None:
    """Refuse a plan built for another TensorRT, GPU or ONNX file. Each plan's entry says what
    it was built with (``build_info.json`` from before: its top-level record)."""
    fix = REBUILD.format(art=artifacts, stage=stage)
    built_with = entry.get("tensorrt", info.get("tensorrt"))
    if built_with != trt_version:
        raise EngineMismatchError(
            f"{entry['plan']} was built with TensorRT {built_with}, this is {trt_version}; {fix}"
        )
    built_on = entry.get("gpu", info.get("gpu", {}))
    if gpu is not None and not same_gpu(built_on, gpu):
        raise EngineMismatchError(
            f"{entry['plan']} was built on {describe(built_on)}, this GPU is {describe(gpu)}; {fix}"
        )
    if entry.get("source_sha256") != source_sha256:
        raise EngineMismatchError(
            f"{entry['plan']} was built from another {entry.get('source_onnx')} (the export "
            f"changed); {fix}"
        )


def built_engines(manifest: Manifest) -> set[tuple[str, str]]:
    """(stage, variant) of every plan ``fila build`` recorded for this export."""
    info_path = manifest.folder / ENGINE_DIR / BUILD_INFO
    if not info_path.is_file():
        return set()
    engines = json.loads(info_path.read_text()).get("engines", {})
    return {(e["stage"], e["precision"]) for e in engines.values()}


class TensorRTUnavailable(FilaError):
    """TensorRT's Python bindings do not import here."""


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(
            "TensorRT is not installed: on a Jetson it comes with JetPack (apt's "
            "python3-libnvinfer; a venv sees it only when made with --system-site-packages); "
            "elsewhere install the tensorrt wheel for your CUDA. `fila check-trt` and "
            "`fila build --emit-trtexec` work without it"
        ) from exc
    return trt


@dataclass
class EngineLoader:
    """``loader()`` -> (engine, its optimization profiles) for one stage variant."""

    manifest: Manifest
    stage: str
    variant: str
    memory: object = field(default=None, repr=False)  # device memory for the runner (tests: fake)

    def entry(self) -> tuple[dict, dict]:
        """(build_info.json, this stage variant's engine entry)."""
        art = self.manifest.folder
        info_path = art / ENGINE_DIR / BUILD_INFO
        if not info_path.is_file():
            raise EngineMismatchError(
                f"no engines in {art / ENGINE_DIR}; build them: fila build --artifacts {art}"
            )
        info = json.loads(info_path.read_text())
        entry = info.get("engines", {}).get(f"{self.stage}.{self.variant}")
        if entry is None:
            raise EngineMismatchError(
                f"no engine for stage {self.stage} ({self.variant}); "
                + REBUILD.format(art=art, stage=self.stage)
            )
        return info, entry

    def profiles(self) -> list[Profile]:
        """The profiles the plan was built with (build_info), else the manifest's."""
        _, entry = self.entry()
        if entry.get("profiles"):
            return [Profile.from_dict(p) for p in entry["profiles"]]
        return stage_profiles(self.manifest, self.stage)

    def __call__(self):
        trt = import_tensorrt()
        info, entry = self.entry()
        art = self.manifest.folder
        source = self.manifest.variant(self.stage, self.variant)["sha256"]
        check_build_info(info, entry, source, trt.__version__, gpu_info(), art, self.stage)
        plan = self.checked_plan(entry)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise EngineMismatchError(
                f"TensorRT could not deserialize {plan}; {REBUILD.format(art=art, stage=self.stage)}"
            )
        return engine

    def checked_plan(self, entry: dict) -> Path:
        """The plan file, refused when it is not the one ``fila build`` recorded (a copy from
        another build, a truncated transfer); unchanged files are not re-hashed."""
        art = self.manifest.folder
        plan = safe_path(art / ENGINE_DIR, entry["plan"])
        fix = REBUILD.format(art=art, stage=self.stage)
        if not plan.is_file():
            raise EngineMismatchError(f"{plan} is missing; {fix}")
        expected = entry.get("plan_sha256")
        if expected is None:
            return plan  # recorded before plans were hashed
        actual = self.manifest.verified.sha256(f"{ENGINE_DIR}/{entry['plan']}", plan, expected)
        if actual != expected:
            raise EngineMismatchError(
                f"{plan} is not the plan fila build recorded (sha256 {actual[:12]}..., recorded "
                f"{expected[:12]}...): it was changed or copied from another build; {fix}"
            )
        return plan
