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
from dataclasses import dataclass
from pathlib import Path

from runtime.backends.tensorrt.device import gpu_info, jetson_release
from runtime.backends.tensorrt.loader import BUILD_INFO, ENGINE_DIR, import_tensorrt
from runtime.errors import FilaError
from runtime.manifest import Manifest, sha256_file
from runtime.profiles import Profile, stage_profiles
from runtime.variants import choose_decoder, precision_spec, stage_variant


def trt_major(version: str) -> int:
    return int(version.split(".")[0])


def polygraphy_profiles(profiles: Sequence[Profile]):
    from polygraphy.backend.trt import Profile as PgProfile

    out = []
    for p in profiles:
        pg = PgProfile()
        for name, (lo, opt, hi) in p.shapes.items():
            pg.add(name, min=lo, opt=opt, max=hi)
        out.append(pg)
    return out


@dataclass(frozen=True)
class BuildOptions:
    workspace_mb: int | None = None
    timing_cache: Path | None = None
    max_batch: int = 1  # the decoder's batch profile: buffers are sized for it on the board
    tf32: bool = (
        False  # TF32 for fp32 layers: faster on Ampere, fewer mantissa bits; off unless asked
    )


def build_stage(
    manifest: Manifest, stage: str, precision: str, out_dir: Path, opts: BuildOptions
) -> dict:
    """Build and serialize one stage's engine (only its serialized bytes are held, not a built
    engine object besides); returns its build_info entry."""
    trt = import_tensorrt()
    from polygraphy.backend.common import SaveBytes
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath

    onnx_path = manifest.stage_path(stage, precision)
    profiles = stage_profiles(manifest, stage, opts.max_batch)
    strongly_typed = trt_major(trt.__version__) >= 10
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed)
    config_kwargs = {"profiles": polygraphy_profiles(profiles), "tf32": opts.tf32}
    if opts.workspace_mb:
        config_kwargs["memory_pool_limits"] = {
            trt.MemoryPoolType.WORKSPACE: opts.workspace_mb << 20
        }
    if opts.timing_cache:
        config_kwargs["load_timing_cache"] = str(opts.timing_cache)
    if not strongly_typed and precision == "fp16":  # TensorRT 8.x/9.x (JetPack 5): flags
        config_kwargs["fp16"] = True
    plan = out_dir / f"{stage}.{precision}.plan"
    t0 = time.perf_counter()
    cache = str(opts.timing_cache) if opts.timing_cache else None
    serialized = EngineBytesFromNetwork(
        network, config=CreateConfig(**config_kwargs), save_timing_cache=cache
    )
    SaveBytes(serialized, str(plan))()
    seconds = round(time.perf_counter() - t0, 2)
    return engine_entry(manifest, stage, precision, plan, profiles) | {
        "build_seconds": seconds,
        "strongly_typed": strongly_typed,
        "tf32": opts.tf32,
    }


def engine_entry(
    manifest: Manifest, stage: str, variant: str, plan: Path, profiles: list[Profile]
) -> dict:
    """A plan's build_info.json entry: what it was built from and with which profiles."""
    return {
        "plan": plan.name,
        "stage": stage,
        "precision": variant,
        "source_onnx": manifest.variant(stage, variant)["file"],
        "source_sha256": manifest.variant(stage, variant)["sha256"],
        "profiles": [p.to_dict() for p in profiles],
        "engine_bytes": plan.stat().st_size,
        "plan_sha256": sha256_file(plan),
    }


def machine_record(trt, built: str) -> dict:
    """Where the plans were built: TensorRT, GPU, L4T release (the runner checks these)."""
    return {
        "tensorrt": trt.__version__,
        "gpu": gpu_info(),
        "jetson_l4t": jetson_release(),
        "host": platform.node(),
        "built": built,
    }


def build_engines(
    artifacts: str | Path,
    precision: str = "fp16",
    stages: Sequence[str] | None = None,
    opts: BuildOptions | None = None,
    progress: bool = True,
) -> Path:
    """``fila build``: engines/<stage>.<precision>.plan + engines/build_info.json."""
    opts = opts or BuildOptions()
    from tqdm import tqdm

    trt = import_tensorrt()
    manifest = Manifest.load(artifacts)
    plan = build_plan(manifest, precision, stages)
    out_dir = manifest.folder / ENGINE_DIR
    out_dir.mkdir(exist_ok=True)
    info_path = out_dir / BUILD_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {"engines": {}}
    info.update(machine_record(trt, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
    for name, variant in tqdm(plan, desc="build", unit="engine", disable=not progress):
        entry = build_stage(manifest, name, variant, out_dir, opts)
        info["engines"][f"{name}.{variant}"] = entry
        info_path.write_text(json.dumps(info, indent=2))
    return info_path


def default_build_stages(manifest: Manifest) -> list[str]:
    """What deployment needs: the fused vision graph, embed and the decoder TensorRT runs."""
    names = [s for s in ("vision", "embed") if s in manifest.stages]
    return [*names, choose_decoder(manifest, "tensorrt")]


def build_plan(manifest: Manifest, precision: str, stages: Sequence[str] | None) -> list[tuple]:
    """(stage, variant) of every engine to build: the stages asked for (default: what
    deployment needs), each at the variant ``precision`` picks for it, as the runtime picks."""
    spec = precision_spec(manifest, precision)
    names = list(stages) if stages else default_build_stages(manifest)
    for name in names:
        if not manifest.spec(name).runs_on("tensorrt"):
            raise FilaError(
                f"stage {name} runs on {', '.join(manifest.spec(name).backends)} only (its "
                "manifest entry); TensorRT cannot build it"
            )
    return [(name, stage_variant(manifest, spec, name, "tensorrt")) for name in names]


def shape_arg(profile_shapes: dict, index: int) -> str:
    return ",".join(
        f"{name}:{'x'.join(map(str, shapes[index]))}" for name, shapes in profile_shapes.items()
    )


def trtexec_script(
    artifacts: str | Path,
    precision: str = "fp16",
    stages: Sequence[str] | None = None,
    opts: BuildOptions | None = None,
) -> str:
    """A shell script of trtexec commands equivalent to ``fila build`` (shapes from the manifest).

    trtexec takes one profile per --minShapes/--optShapes/--maxShapes group, in order, so the
    engines have the same profiles as ours and load in the runtime the same way.
    """
    opts = opts or BuildOptions()
    manifest = Manifest.load(artifacts)
    lines = [
        "#!/usr/bin/env bash",
        "# Generated by `fila build --emit-trtexec`: builds the same engines as `fila build` with",
        "# the board's own trtexec (JetPack: /usr/src/tensorrt/bin/trtexec). Run from the artifact",
        "# folder; then `fila build --artifacts . --record` writes build_info.json for them.",
        "set -euo pipefail",
        'TRTEXEC="${TRTEXEC:-trtexec}"',
        f"mkdir -p {ENGINE_DIR}",
    ]
    for name, variant in build_plan(manifest, precision, stages):
        onnx_file = manifest.variant(name, variant)["file"]
        args = [
            f"--onnx={onnx_file}",
            f"--saveEngine={ENGINE_DIR}/{name}.{variant}.plan",
            "--stronglyTyped",
            "--skipInference",
            *([] if opts.tf32 else ["--noTF32"]),
        ]
        profiles = stage_profiles(manifest, name, opts.max_batch)
        for p in profiles:
            args += [
                f"--minShapes={shape_arg(p.shapes, 0)}",
                f"--optShapes={shape_arg(p.shapes, 1)}",
                f"--maxShapes={shape_arg(p.shapes, 2)}",
            ]
        if opts.workspace_mb:
            args.append(f"--memPoolSize=workspace:{opts.workspace_mb}M")
        lines.append(f"# {name} ({variant}): {len(profiles)} profile(s)")
        lines.append('"$TRTEXEC" ' + " \\\n    ".join(shlex.quote(a) for a in args))
    return "\n".join(lines) + "\n"


def record_engines(
    artifacts: str | Path,
    precision: str = "fp16",
    stages: Sequence[str] | None = None,
    opts: BuildOptions | None = None,
) -> Path:
    """Write build_info.json for plans built elsewhere (the trtexec script) on this machine."""
    trt = import_tensorrt()
    manifest = Manifest.load(artifacts)
    out_dir = manifest.folder / ENGINE_DIR
    info = machine_record(trt, "recorded") | {"engines": {}}
    for name, variant in build_plan(manifest, precision, stages):
        plan = out_dir / f"{name}.{variant}.plan"
        if not plan.is_file():
            raise FilaError(f"{plan} not found; run the trtexec script first")
        profiles = stage_profiles(manifest, name, (opts or BuildOptions()).max_batch)
        info["engines"][f"{name}.{variant}"] = engine_entry(manifest, name, variant, plan, profiles)
    path = out_dir / BUILD_INFO
    path.write_text(json.dumps(info, indent=2))
    return path
