"""Where the vision encoder's time goes on ONNX Runtime's CPU provider, and what each graph form
buys: the figures behind the export's opset and the ``int8-cpu`` variants.

1. GELU form: the checkpoint's ConvNeXt exported at opset 18 (GELU as Div/Erf/Add/Mul/Mul) and
   at opset 20 (one ``Gelu`` node), against PyTorch eager on the same global view, with ONNX
   Runtime's per-op-type profile of each; and the ViT MLP's two GEMM shapes in PyTorch (MKL) and
   ONNX Runtime (MLAS), in GFLOP/s.
2. Fused attention: one ViT attention of the export's shape as the exporter decomposes it
   (Reshape/Transpose/MatMul/Softmax/MatMul) and as ``com.microsoft.MultiHeadAttention``; and a
   ViT segment through ONNX Runtime's transformer optimizer (``model_type="clip"``), with the
   contrib ops it fused.
3. Each vision stage's variants on ONNX Runtime (fp32, the TensorRT-layout ``int8``, the
   ``int8-cpu`` layout), with the cosine calibration measured for each.

Every pair or group runs alternately, ``--rounds`` times, in one process at ``--threads``; the
medians and ratios are printed (and written with ``--out``).

    python -m benchmarks.vision_ort --checkpoint CKPT --artifacts DIR [--threads 1] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.op_profile import graph_profile  # noqa: E402 - after the path set-up

IMAGE = ROOT / "fila_export/demo/examples/photos/chelsea.jpg"


def alternate(fns: dict[str, Callable], rounds: int) -> dict[str, float]:
    """Median ms of each callable, the callables taking turns (one warm-up call each first)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000)
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def recorded_feeds(manifest, threads: int) -> dict[str, dict]:
    """Each modular vision stage's inputs for the demo photo (its fp32 chain run once)."""
    from runtime.image_io import load_image
    from runtime.pipeline import load_vision_chain
    from runtime.preprocess import preprocess
    from runtime.vision import image_feeds

    image = preprocess(load_image(IMAGE), manifest.preprocess)
    encoder = load_vision_chain(manifest, "onnxruntime", "fp32", threads=threads)
    feeds: dict[str, dict] = {}
    encoder(image, record=feeds)
    feeds["vision"] = image_feeds(image)
    return feeds


def gelu_forms(checkpoint: Path, global_view: np.ndarray, threads: int, rounds: int) -> dict:
    """The ConvNeXt at opset 18 and 20 on ONNX Runtime, and in PyTorch eager."""
    import torch

    from fila_export.export.stage_export import quiet
    from fila_export.model.checkpoint import load_checkpoint
    from fila_export.model.vision import convnext_maps
    from runtime import onnx_io

    torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint)[0].convnext.eval()
    x = torch.from_numpy(global_view)

    class Maps(torch.nn.Module):
        def forward(self, view):
            return tuple(convnext_maps(model, view))

    fns, profiles = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for opset in (18, 20):
            path = Path(tmp) / f"convnext.{opset}.onnx"
            with torch.no_grad(), quiet():
                torch.onnx.export(
                    Maps(), (x,), path, dynamo=True, opset_version=opset, verbose=False
                )
            sess = onnx_io.session(path, threads)
            feed = {sess.get_inputs()[0].name: global_view}
            fns[f"onnxruntime opset {opset}"] = lambda s=sess, f=feed: s.run(None, f)
            profiles[f"opset {opset}"] = graph_profile(path, feed, threads)
        fns["pytorch eager"] = torch.no_grad()(lambda: Maps()(x))
        want = [t.numpy() for t in fns["pytorch eager"]()]
        diff = {
            k: max(float(np.abs(a - b).max()) for a, b in zip(fn(), want, strict=True))
            for k, fn in fns.items()
            if k != "pytorch eager"
        }
        ms = alternate(fns, rounds)
    return {
        "ms": ms,
        "max_abs_diff_vs_pytorch": diff,
        "profile_ms_by_op": profiles,
        "opset18_over_opset20": ratio(ms, "onnxruntime opset 18", "onnxruntime opset 20"),
        "torch_over_opset20": ratio(ms, "pytorch eager", "onnxruntime opset 20"),
    }


def gemm_forms(rows: int, width: int, mlp: int, threads: int, rounds: int) -> dict:
    """The ViT MLP's GEMMs ([rows, width] x [width, mlp] and back) in PyTorch and ONNX Runtime."""
    import torch
    from onnx import TensorProto, helper

    from runtime import onnx_io

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    out = {}
    for k, n in ((width, mlp), (mlp, width)):
        a = rng.standard_normal((rows, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])],
            "gemm",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [rows, k])],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [rows, n])],
            [helper.make_tensor("b", TensorProto.FLOAT, [k, n], b.ravel())],
        )
        sess = onnx_io.session(onnx_io.make_model(graph, [helper.make_opsetid("", 20)]), threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        fns = {
            "pytorch": lambda x=ta, y=tb: x @ y,
            "onnxruntime": lambda f=sess, x=a: f.run(None, {"a": x}),
        }
        ms = alternate(fns, rounds)
        gflop = 2 * rows * k * n / 1e9
        out[f"{rows}x{k}x{n}"] = {
            name: {"ms": t, "gflop_s": round(gflop / t * 1000, 1)} for name, t in ms.items()
        }
    return out


def attention_forms(
    tiles: int, tokens: int, width: int, heads: int, threads: int, rounds: int
) -> dict:
    """One attention, decomposed as the exporter writes it, against MultiHeadAttention."""
    from onnx import TensorProto, helper

    from runtime import onnx_io

    def info(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [tiles, tokens, width])

    ins, out = [info(n) for n in "qkv"], [info("o")]
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    mha = helper.make_node(
        "MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=heads
    )
    split = helper.make_tensor(
        "split", TensorProto.INT64, [4], [tiles, tokens, heads, width // heads]
    )
    join = helper.make_tensor("join", TensorProto.INT64, [3], [tiles, tokens, width])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [(width // heads) ** -0.5])
    nodes = []
    for n in "qkv":
        perm = [0, 2, 3, 1] if n == "k" else [0, 2, 1, 3]
        nodes += [
            helper.make_node("Reshape", [n, "split"], [n + "4"]),
            helper.make_node("Transpose", [n + "4"], [n + "h"], perm=perm),
        ]
    nodes += [
        helper.make_node("MatMul", ["qh", "kh"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "vh"], ["oh"]),
        helper.make_node("Transpose", ["oh"], ["ot"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ot", "join"], ["o"]),
    ]
    graphs = {
        "decomposed": helper.make_graph(nodes, "a", ins, out, [split, join, scale]),
        "MultiHeadAttention": helper.make_graph([mha], "m", ins, out),
    }
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((tiles, tokens, width)).astype(np.float32) for n in "qkv"}
    sessions = {
        k: onnx_io.session(onnx_io.make_model(g, opsets), threads) for k, g in graphs.items()
    }
    diff = float(
        np.abs(
            sessions["decomposed"].run(None, feeds)[0]
            - sessions["MultiHeadAttention"].run(None, feeds)[0]
        ).max()
    )
    ms = alternate({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, rounds)
    return {
        "ms": ms,
        "max_abs_diff": diff,
        "decomposed_over_mha": ratio(ms, "decomposed", "MultiHeadAttention"),
    }


def optimizer_forms(manifest, stage: str, feeds: dict, threads: int, rounds: int) -> dict:
    """A ViT segment as exported and after onnxruntime.transformers' optimizer."""
    from onnxruntime.transformers import optimizer

    from runtime import onnx_io

    vit = manifest.model["vision"]
    fused = optimizer.optimize_model(
        str(manifest.stage_path(stage)),
        model_type="clip",
        num_heads=vit["num_attention_heads"],
        hidden_size=vit["hidden_size"],
        opt_level=0,
    )
    stats = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
    sessions = {
        "exported": onnx_io.session(manifest.stage_path(stage), threads),
        "transformer optimizer": onnx_io.session(fused.model, threads),
    }
    outs = [s.run(None, feeds)[0] for s in sessions.values()]
    ms = alternate({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, rounds)
    return {
        "stage": stage,
        "ms": ms,
        "fused_ops": stats,
        "max_abs_diff": float(np.abs(outs[0] - outs[1]).max()),
        "exported_over_optimized": ratio(ms, "exported", "transformer optimizer"),
    }


def stage_variants(manifest, feeds: dict, threads: int, rounds: int) -> list[dict]:
    """Each vision stage's ONNX Runtime variants, timed in turns, with their calibration cosine."""
    from runtime import onnx_io

    rows = []
    for stage in [*manifest.vision_chain, "vision"]:
        variants = manifest.variants_for(stage, "onnxruntime")
        sessions = {v: onnx_io.session(manifest.stage_path(stage, v), threads) for v in variants}
        fns = {v: (lambda s=s, f=feeds[stage]: s.run(None, f)) for v, s in sessions.items()}
        ms = alternate(fns, rounds)
        for v in variants:
            accuracy = manifest.variant(stage, v).get("accuracy", {})
            rows.append(
                {
                    "stage": stage,
                    "variant": v,
                    "ms": ms[v],
                    "vs_fp32": ratio(ms, "fp32", v),
                    "cosine": accuracy.get("cosine"),
                }
            )
        del sessions, fns
    return rows


def ratio(ms: dict, slow: str, fast: str) -> float | None:
    return round(ms[slow] / ms[fast], 3) if slow in ms and fast in ms else None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from benchmarks.machine import cpu_identity
    from benchmarks.report import publish
    from runtime.manifest import Manifest

    manifest = Manifest.load(args.artifacts)
    feeds = recorded_feeds(manifest, args.threads)
    vit = manifest.model["vision"]
    tiles, tokens, width = next(f["hidden"] for f in feeds.values() if "hidden" in f).shape
    result = {
        "command": "python -m benchmarks.vision_ort "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "cpu": cpu_identity(),
        "threads": args.threads,
        "rounds": args.rounds,
        "gelu": gelu_forms(
            args.checkpoint, feeds["convnext"]["global_view"], args.threads, args.rounds
        ),
        "gemm": gemm_forms(
            tiles * tokens, width, vit["intermediate_size"], args.threads, args.rounds
        ),
        "attention": attention_forms(
            tiles, tokens, width, vit["num_attention_heads"], args.threads, args.rounds
        ),
        "optimizer": optimizer_forms(manifest, "vit.1", feeds["vit.1"], args.threads, args.rounds),
        "variants": stage_variants(manifest, feeds, args.threads, args.rounds),
    }
    publish(result, report, args.out)
    return result


def report(r: dict) -> str:
    from benchmarks.report import script_header, table

    g, a, o = r["gelu"], r["attention"], r["optimizer"]
    diff = ", ".join(f"{k} {v:.1e}" for k, v in g["max_abs_diff_vs_pytorch"].items())
    lines = [
        *script_header(r),
        f"threads {r['threads']}; medians (ms) of {r['rounds']} rounds, the forms taking turns",
        "",
        "ConvNeXt: " + ", ".join(f"{k} {v:.1f}" for k, v in g["ms"].items()),
        f"  opset 18 / opset 20 = {g['opset18_over_opset20']}x; "
        f"PyTorch / opset 20 = {g['torch_over_opset20']}x; max |diff| vs PyTorch: {diff}",
        *(f"  profile {k} (ms by op): {v}" for k, v in g["profile_ms_by_op"].items()),
        *(
            f"GEMM {shape}: "
            + ", ".join(f"{n} {x['ms']:.1f} ms ({x['gflop_s']} GFLOP/s)" for n, x in f.items())
            for shape, f in r["gemm"].items()
        ),
        "one ViT attention: " + ", ".join(f"{k} {v:.1f}" for k, v in a["ms"].items()),
        f"  decomposed / MultiHeadAttention = {a['decomposed_over_mha']}x "
        f"(max |diff| {a['max_abs_diff']:.1e})",
        f"{o['stage']}: " + ", ".join(f"{k} {v:.1f}" for k, v in o["ms"].items()),
        f"  exported / optimized = {o['exported_over_optimized']}x; fused: {o['fused_ops']} "
        f"(max |diff| {o['max_abs_diff']:.1e})",
        "",
    ]
    rows = [
        [x["stage"], x["variant"], f"{x['ms']:.1f}", f"{x['vs_fp32']}x", x["cosine"] or "-"]
        for x in r["variants"]
    ]
    header = ["stage", "variant", "ms", "fp32 / variant", "cosine vs fp32"]
    return "\n".join(lines + table(header, rows))


if __name__ == "__main__":
    main()
