"""TensorRT engine builds from the manifest, and the equivalent trtexec script.

Builds call TensorRT's own builder API (Builder, OnnxParser, IBuilderConfig, optimization
profiles): the graph is parsed from its file (external data beside it), one profile per entry of
``runtime.profiles``, and only the serialized plan is held. Precision comes from the ONNX graph
(strongly typed fp16, explicit Q/DQ int8 in an fp16 graph): TensorRT 10 parses it strongly typed
with no precision flags, which is what TensorRT 11 requires (it removed them) and what TensorRT
10.3 (JetPack 6.1/6.2) accepts. TensorRT 8.6 (JetPack 6.0) and 9.x have no strong typing: there the
builder gets FP16 for a graph with fp16 tensors and INT8 for one with Q/DQ nodes (an explicitly
quantized network is refused without it). TF32, on by default in TensorRT, is cleared unless
asked for.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.backends.tensorrt.device import gpu_info, jetson_release
from runtime.backends.tensorrt.loader import (
    BUILD_INFO,
    ENGINE_DIR,
    MACHINE_KEYS,
    import_tensorrt,
    read_build_info,
)
from runtime.errors import FilaError
from runtime.manifest import Manifest, sha256_file
from runtime.profiles import Profile, stage_profiles
from runtime.variants import choose_decoder, precision_spec, stage_variant

if TYPE_CHECKING:
    import tensorrt as trt


def trt_major(version: str) -> int:
    return int(version.split(".")[0])


@dataclass(frozen=True)
class BuildOptions:
    workspace_mb: int | None = None
    timing_cache: Path | None = None
    max_batch: int = 1  # the decoder's batch profile: buffers are sized for it on the board
    tf32: bool = (
        False  # TF32 for fp32 layers: faster on Ampere, fewer mantissa bits; off unless asked
    )


class BuildError(FilaError):
    """TensorRT could not parse or build a graph."""


def graph_precisions(onnx_path: Path) -> tuple[bool, bool]:
    """(has fp16 tensors, has Q/DQ nodes): the builder flags a weakly typed network needs."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    fp16 = onnx.TensorProto.FLOAT16
    typed = [*graph.input, *graph.output, *graph.value_info]
    has_fp16 = any(i.data_type == fp16 for i in graph.initializer) or any(
        v.type.tensor_type.elem_type == fp16 for v in typed
    )
    has_fp16 = has_fp16 or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in n.attribute)
        for n in graph.node
    )
    qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)
    return has_fp16, qdq


def parse_network(trt_mod, builder: trt.Builder, logger: trt.ILogger, onnx_path: Path):
    """The graph parsed into a network (strongly typed on TensorRT 10+), errors named."""
    strongly_typed = trt_major(trt_mod.__version__) >= 10
    flag = "STRONGLY_TYPED" if strongly_typed else "EXPLICIT_BATCH"
    network = builder.create_network(1 << int(getattr(trt_mod.NetworkDefinitionCreationFlag, flag)))
    parser = trt_mod.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(
            f"TensorRT's ONNX parser refused {onnx_path.name}: {errors or 'see its log'}; "
            f"fila check-trt --artifacts {onnx_path.parent} names unsupported operators"
        )
    return network, parser, strongly_typed


def builder_config(
    trt_mod, builder: trt.Builder, profiles: Sequence[Profile], opts: BuildOptions
) -> trt.IBuilderConfig:
    """Profiles, workspace limit, TF32 and the timing cache (read if the file exists)."""
    config = builder.create_builder_config()
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.shapes.items():
            dims = [trt_mod.Dims(list(shape)) for shape in (lo, opt, hi)]
            trt_profile.set_shape(name, *dims)
        if config.add_optimization_profile(trt_profile) < 0:
            raise BuildError(f"TensorRT refused optimization profile {profile.name}")
    if not opts.tf32:
        config.clear_flag(trt_mod.BuilderFlag.TF32)
    if opts.workspace_mb:
        config.set_memory_pool_limit(trt_mod.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    if opts.timing_cache:
        path = Path(opts.timing_cache)
        cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return config


def build_stage(
    manifest: Manifest, stage: str, precision: str, out_dir: Path, opts: BuildOptions
) -> dict:
    """Build and serialize one stage's engine (only its serialized bytes are held, not a built
    engine object besides); returns its build_info entry."""
    trt_mod = import_tensorrt()
    onnx_path = manifest.stage_path(stage, precision)
    profiles = stage_profiles(manifest, stage, opts.max_batch)
    logger = trt_mod.Logger(trt_mod.Logger.WARNING)
    builder = trt_mod.Builder(logger)
    network, _parser, strongly_typed = parse_network(trt_mod, builder, logger, onnx_path)
    config = builder_config(trt_mod, builder, profiles, opts)
    flags = []
    if not strongly_typed:  # TensorRT 8.x/9.x (JetPack 6.0: 8.6): precision by flags
        has_fp16, qdq = graph_precisions(onnx_path)
        # FP16 with INT8 too: the layers left unquantized then run in fp16, not fp32
        flags = [f for f, on in (("FP16", has_fp16 or qdq), ("INT8", qdq)) if on]
        for flag in flags:
            config.set_flag(getattr(trt_mod.BuilderFlag, flag))
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(
            f"TensorRT could not build stage {stage} ({precision}) from {onnx_path.name}; its "
            "log above says why (a smaller --workspace-mb, or fila check-trt, may help)"
        )
    plan = out_dir / f"{stage}.{precision}.plan"
    plan.write_bytes(memoryview(serialized))
    del serialized
    if opts.timing_cache:
        Path(opts.timing_cache).write_bytes(memoryview(config.get_timing_cache().serialize()))
    seconds = round(time.perf_counter() - t0, 2)
    return engine_entry(manifest, stage, precision, plan, profiles) | {
        "build_seconds": seconds,
        "strongly_typed": strongly_typed,
        "builder_flags": flags,
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


def machine_record(trt_mod, built: str) -> dict:
    """Where a plan was built: TensorRT, GPU, L4T release (the runner checks the first two)."""
    return {
        "tensorrt": trt_mod.__version__,
        "gpu": gpu_info(),
        "jetson_l4t": jetson_release(),
        "host": platform.node(),
        "built": built,
    }


def add_entry(out_dir: Path, info: dict, key: str, entry: dict, machine: dict) -> None:
    """Record one plan (with what it was built with) and rewrite build_info.json atomically (a
    run starting meanwhile reads the old record or the new one); the top level says where the
    latest plan was built, each entry where its own was."""
    info.update(machine)
    info["engines"][key] = entry | {k: machine[k] for k in MACHINE_KEYS}
    tmp = out_dir / f"{BUILD_INFO}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, out_dir / BUILD_INFO)


def build_engines(
    artifacts: str | Path,
    precision: str = "fp16",
    stages: Sequence[str] | None = None,
    opts: BuildOptions | None = None,
    progress: bool = True,
) -> Path:
    """``fila build``: engines/<stage>.<precision>.plan + engines/build_info.json (entries of
    other precisions are kept)."""
    opts = opts or BuildOptions()
    from tqdm import tqdm

    trt_mod = import_tensorrt()
    manifest = Manifest.load(artifacts)
    plan = build_plan(manifest, precision, stages)
    out_dir = manifest.folder / ENGINE_DIR
    out_dir.mkdir(exist_ok=True)
    info = read_build_info(out_dir)
    machine = machine_record(trt_mod, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    for name, variant in tqdm(plan, desc="build", unit="engine", disable=not progress):
        entry = build_stage(manifest, name, variant, out_dir, opts)
        add_entry(out_dir, info, f"{name}.{variant}", entry, machine)
    return out_dir / BUILD_INFO


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


def typing_args(trt_version: str, onnx_path: Path) -> list[str]:
    """trtexec's precision arguments: ``--stronglyTyped`` on TensorRT 10+, the flags a weakly
    typed build needs before (TensorRT 8.6 has no ``--stronglyTyped``)."""
    if trt_major(trt_version) >= 10:
        return ["--stronglyTyped"]
    has_fp16, qdq = graph_precisions(onnx_path)
    return [*(["--fp16"] if has_fp16 or qdq else []), *(["--int8"] if qdq else [])]


def trtexec_script(
    artifacts: str | Path,
    precision: str = "fp16",
    stages: Sequence[str] | None = None,
    opts: BuildOptions | None = None,
    trt_version: str = "10.3",
) -> str:
    """A shell script of trtexec commands equivalent to ``fila build`` (shapes from the manifest)
    for the TensorRT the board has (default: JetPack 6.1/6.2's 10.3).

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
            *typing_args(trt_version, manifest.stage_path(name, variant)),
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
    """Add build_info.json entries for plans built here by other means (the trtexec script),
    keeping the entries already there."""
    trt_mod = import_tensorrt()
    manifest = Manifest.load(artifacts)
    out_dir = manifest.folder / ENGINE_DIR
    info = read_build_info(out_dir)
    machine = machine_record(
        trt_mod, "recorded " + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    )
    for name, variant in build_plan(manifest, precision, stages):
        plan = out_dir / f"{name}.{variant}.plan"
        if not plan.is_file():
            raise FilaError(f"{plan} not found; run the trtexec script first")
        profiles = stage_profiles(manifest, name, (opts or BuildOptions()).max_batch)
        entry = engine_entry(manifest, name, variant, plan, profiles)
        add_entry(out_dir, info, f"{name}.{variant}", entry, machine)
    return out_dir / BUILD_INFO
