"""TensorRT engine builds from the manifest, and the equivalent trtexec script.

Precision comes from the ONNX graph (strongly typed fp16, explicit Q/DQ int8): the network is parsed
strongly typed and no precision builder flags are set, which is what TensorRT 11 requires (it
removed them) and what TensorRT 10.x (JetPack 6 ships 10.3) accepts. Polygraphy's loaders do the
parsing, config and serialisation.
"""

from __future__ import annotations

import json
import platform
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

from runtime.backends.tensorrt import gpu_info, jetson_release
from runtime.errors import FilaError
from runtime.manifest import Manifest, sha256_file
from runtime.profiles import Profile, stage_profiles

ENGINE_DIR = "engines"
BUILD_INFO = "build_info.json"


class TensorRTUnavailable(FilaError):
    """TensorRT or a CUDA GPU is not present here."""


def trt_major(version: str) -> int:
    return int(version.split(".")[0])


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(
            "TensorRT is not installed: on Jetson it comes with JetPack (python3-libnvinfer); "
            "elsewhere install the tensorrt wheel for your CUDA. `fila check-trt` and "
            "`fila build --emit-trtexec` work without it"
        ) from exc
    return trt


def polygraphy_profiles(profiles: Sequence[Profile]):
    from polygraphy.backend.trt import Profile as PgProfile

    out = []
    for p in profiles:
        pg = PgProfile()
        for name, (lo, opt, hi) in p.shapes.items():
            pg.add(name, min=lo, opt=opt, max=hi)
        out.append(pg)
    return out


def build_stage(
    manifest: Manifest,
    stage: str,
    precision: str,
    out_dir: Path,
    workspace_mb: int | None = None,
    timing_cache: Path | None = None,
) -> dict:
    """Build and serialize one stage's engine; returns its build_info entry."""
    trt = import_tensorrt()
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        SaveEngine,
    )

    onnx_path = manifest.stage_path(stage, precision)
    profiles = stage_profiles(manifest, stage)
    strongly_typed = trt_major(trt.__version__) >= 10
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed)
    config_kwargs = {"profiles": polygraphy_profiles(profiles)}
    if workspace_mb:
        config_kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: workspace_mb << 20}
    if timing_cache:
        config_kwargs["load_timing_cache"] = str(timing_cache)
    if not strongly_typed and precision == "fp16":  # TensorRT 8.x/9.x (JetPack 5): flags
        config_kwargs["fp16"] = True
    plan = out_dir / f"{stage}.{precision}.plan"
    t0 = time.perf_counter()
    engine = EngineFromNetwork(
        network,
        config=CreateConfig(**config_kwargs),
        save_timing_cache=str(timing_cache) if timing_cache else None,
    )
    SaveEngine(engine, str(plan))()
    return {
        "plan": plan.name,
        "stage": stage,
        "precision": precision,
        "source_onnx": manifest.variant(stage, precision)["file"],
        "source_sha256": manifest.variant(stage, precision)["sha256"],
        "profiles": [p.to_dict() for p in profiles],
        "build_seconds": round(time.perf_counter() - t0, 2),
        "engine_bytes": plan.stat().st_size,
        "plan_sha256": sha256_file(plan),
        "strongly_typed": strongly_typed,
    }


def build_engines(
    artifacts: str | Path,
    precision: str = "fp16",
    stages: Sequence[str] | None = None,
    workspace_mb: int | None = None,
    timing_cache: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """``fila build``: engines/<stage>.<precision>.plan + engines/build_info.json."""
    from tqdm import tqdm

    trt = import_tensorrt()
    manifest = Manifest.load(artifacts)
    names = list(stages) if stages else default_build_stages(manifest)
    out_dir = manifest.folder / ENGINE_DIR
    out_dir.mkdir(exist_ok=True)
    info_path = out_dir / BUILD_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {"engines": {}}
    info.update(
        {
            "tensorrt": trt.__version__,
            "gpu": gpu_info(),
            "jetson_l4t": jetson_release(),
            "host": platform.node(),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    for name in tqdm(names, desc="build", unit="engine", disable=not progress):
        variant = precision if precision in manifest.stage(name)["variants"] else "fp32"
        info["engines"][f"{name}.{variant}"] = build_stage(
            manifest,
            name,
            variant,
            out_dir,
            workspace_mb,
            Path(timing_cache) if timing_cache else None,
        )
        info_path.write_text(json.dumps(info, indent=2))
    return info_path


def default_build_stages(manifest: Manifest) -> list[str]:
    """What deployment needs: the fused vision graph, embed and decoder."""
    return [s for s in ("vision", "embed", "decoder") if s in manifest.stages]


def shape_arg(profile_shapes: dict, index: int) -> str:
    return ",".join(
        f"{name}:{'x'.join(map(str, shapes[index]))}" for name, shapes in profile_shapes.items()
    )


def trtexec_script(
    artifacts: str | Path,
    precision: str = "fp16",
    stages: Sequence[str] | None = None,
    workspace_mb: int | None = None,
) -> str:
    """A shell script of trtexec commands equivalent to ``fila build`` (shapes from the manifest).

    trtexec takes one profile per --minShapes/--optShapes/--maxShapes group, in order, so the
    engines have the same profiles as ours and load in the runtime the same way.
    """
    manifest = Manifest.load(artifacts)
    names = list(stages) if stages else default_build_stages(manifest)
    lines = [
        "#!/usr/bin/env bash",
        "# Generated by `fila build --emit-trtexec`: builds the same engines as `fila build` with",
        "# the board's own trtexec (JetPack: /usr/src/tensorrt/bin/trtexec). Run from the artifact",
        "# folder; then `fila build --artifacts . --record` writes build_info.json for them.",
        "set -euo pipefail",
        'TRTEXEC="${TRTEXEC:-trtexec}"',
        f"mkdir -p {ENGINE_DIR}",
    ]
    for name in names:
        variant = precision if precision in manifest.stage(name)["variants"] else "fp32"
        onnx_file = manifest.variant(name, variant)["file"]
        args = [
            f"--onnx={onnx_file}",
            f"--saveEngine={ENGINE_DIR}/{name}.{variant}.plan",
            "--stronglyTyped",
            "--skipInference",
        ]
        for p in stage_profiles(manifest, name):
            args += [
                f"--minShapes={shape_arg(p.shapes, 0)}",
                f"--optShapes={shape_arg(p.shapes, 1)}",
                f"--maxShapes={shape_arg(p.shapes, 2)}",
            ]
        if workspace_mb:
            args.append(f"--memPoolSize=workspace:{workspace_mb}M")
        lines.append(f"# {name} ({variant}): {len(stage_profiles(manifest, name))} profile(s)")
        lines.append('"$TRTEXEC" ' + " \\\n    ".join(shlex.quote(a) for a in args))
    return "\n".join(lines) + "\n"


def record_engines(
    artifacts: str | Path, precision: str = "fp16", stages: Sequence[str] | None = None
) -> Path:
    """Write build_info.json for plans built elsewhere (the trtexec script) on this machine."""
    trt = import_tensorrt()
    manifest = Manifest.load(artifacts)
    out_dir = manifest.folder / ENGINE_DIR
    info = {
        "tensorrt": trt.__version__,
        "gpu": gpu_info(),
        "jetson_l4t": jetson_release(),
        "host": platform.node(),
        "built": "recorded",
        "engines": {},
    }
    for name in stages or default_build_stages(manifest):
        variant = precision if precision in manifest.stage(name)["variants"] else "fp32"
        plan = out_dir / f"{name}.{variant}.plan"
        if not plan.is_file():
            raise FilaError(f"{plan} not found; run the trtexec script first")
        info["engines"][f"{name}.{variant}"] = {
            "plan": plan.name,
            "stage": name,
            "precision": variant,
            "source_onnx": manifest.variant(name, variant)["file"],
            "source_sha256": manifest.variant(name, variant)["sha256"],
            "profiles": [p.to_dict() for p in stage_profiles(manifest, name)],
            "engine_bytes": plan.stat().st_size,
            "plan_sha256": sha256_file(plan),
        }
    path = out_dir / BUILD_INFO
    path.write_text(json.dumps(info, indent=2))
    return path
