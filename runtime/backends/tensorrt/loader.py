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


MACHINE_KEYS = ("tensorrt", "gpu", "jetson_l4t", "built")


def read_build_info(engine_dir: Path) -> dict:
    """``engines/build_info.json`` (``{"engines": {}}`` when there is none), each entry carrying
    what its plan was built with: an entry written before entries did gets the top level's
    record now, so a later build that rewrites the top level does not vouch for it."""
    path = Path(engine_dir) / BUILD_INFO
    if not path.is_file():
        return {"engines": {}}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineMismatchError(
            f"{path} is not valid JSON ({exc}); rebuild the engines: fila build --artifacts "
            f"{Path(engine_dir).parent}"
        ) from exc
    for entry in info.setdefault("engines", {}).values():
        for key in MACHINE_KEYS:
            if key in info:
                entry.setdefault(key, info[key])
    return info


def built_engines(manifest: Manifest) -> set[tuple[str, str]]:
    """(stage, variant) of every plan ``fila build`` recorded for this export."""
    engines = read_build_info(manifest.folder / ENGINE_DIR)["engines"]
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
    runtime: object = field(default=None, repr=False)  # the trt.Runtime of the last engine made

    def entry(self) -> tuple[dict, dict]:
        """(build_info.json, this stage variant's engine entry)."""
        art = self.manifest.folder
        if not (art / ENGINE_DIR / BUILD_INFO).is_file():
            raise EngineMismatchError(
                f"no engines in {art / ENGINE_DIR}; build them: fila build --artifacts {art}"
            )
        info = read_build_info(art / ENGINE_DIR)
        entry = info["engines"].get(f"{self.stage}.{self.variant}")
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
        """The deserialized engine; the TensorRT runtime that made it is kept in ``runtime``
        (it must outlive the engine: the runner holds both and releases the engine first)."""
        trt = import_tensorrt()
        info, entry = self.entry()
        art = self.manifest.folder
        source = self.manifest.variant(self.stage, self.variant)["sha256"]
        check_build_info(info, entry, source, trt.__version__, gpu_info(), art, self.stage)
        data = self.plan_bytes(entry)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = self.runtime.deserialize_cuda_engine(data)
        del data
        if engine is None:
            raise EngineMismatchError(
                f"TensorRT could not deserialize {entry['plan']}; "
                f"{REBUILD.format(art=art, stage=self.stage)}"
            )
        return engine

    def plan_bytes(self, entry: dict) -> bytes | bytearray:
        """The plan's bytes, read once and refused when they are not the plan ``fila build``
        recorded (a copy from another build, a truncated transfer); an unchanged file is not
        hashed again (``runtime.verified``)."""
        art = self.manifest.folder
        plan = safe_path(art / ENGINE_DIR, entry["plan"])
        fix = REBUILD.format(art=art, stage=self.stage)
        if not plan.is_file():
            raise EngineMismatchError(f"{plan} is missing; {fix}")
        expected = entry.get("plan_sha256")
        if expected is None:  # recorded before plans were hashed
            return plan.read_bytes()
        name = f"{ENGINE_DIR}/{entry['plan']}"
        data, actual = self.manifest.verified.read(name, plan, expected)
        if actual != expected:
            raise EngineMismatchError(
                f"{plan} is not the plan fila build recorded (sha256 {actual[:12]}..., recorded "
                f"{expected[:12]}...): it was changed or copied from another build; {fix}"
            )
        return data
