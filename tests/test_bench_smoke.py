"""`fila bench` produces its files and fields (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_fila

from benchmarks.machine import STEADY_MALLOC_ENV, steady_allocator


def test_bench_writes_json_markdown_and_plots(tiny_artifacts, tiny_checkpoint, tmp_path):
    out = tmp_path / "bench"
    r = run_fila(
        "bench",
        "--artifacts",
        str(tiny_artifacts),
        "--checkpoint",
        str(tiny_checkpoint),
        "--backends",
        "torch,onnxruntime",
        "--precisions",
        "fp32,fp16",
        "--runs",
        "2",
        "--warmup",
        "1",
        "--decode-steps",
        "2",
        "--contexts",
        "16,64",
        "--rounds",
        "2",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "results.json").read_text())
    labels = [(x["backend"], x["precision"]) for x in data["results"]]
    assert labels == [("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16")]
    for result in data["results"]:
        assert {"vision", "prefill", "decode_step", "vit", "cvfm", "convnext"} <= set(
            result["stages"]
        )
        assert set(result["decode"]) == {"16", "64"}
        # two rounds pooled: 2 decode steps and 2 whole answers (3 // 2 rounded up) per round
        assert result["decode"]["16"]["runs"] == 4 and result["end_to_end"]["runs"] == 4
        assert result["stages"]["vision"]["runs"] == 2
        assert result["rounds"] == 2  # each in a process of its own
        # the peak is this target's (the 512 MB bandwidth probe before it peaks above 1.5 GB)
        assert result["peak_rss_scope"] == "target"
        assert result["rss_at_start_mb"] < result["peak_rss_mb"] < 1500, result["peak_rss_mb"]
        assert result["decode"]["16"]["roofline_ratio"] > 0
        assert result["speedup_vs_torch"]["end_to_end"] > 0
        # each column process ran with the fixed allocator thresholds
        assert result["allocator_env"] == STEADY_MALLOC_ENV
        assert result["threads_used"] >= 1  # read back from the session / torch
    assert data["machine"]["measured_bandwidth_gb_s"] > 0
    assert (out / "latency_per_stage.png").stat().st_size > 1000
    assert (out / "decode_vs_context.png").stat().st_size > 1000
    assert "| decode_step |" in (out / "results.md").read_text()
    # which fused vision graph each column ran (fp16: the fp16 graph; PyTorch: its own model)
    assert [x["vision"].get("variant") for x in data["results"]] == [None, "fp32", "fp16"]
    assert (
        "| vision graph (cosine vs fp32, from calibration) | - | fp32 | fp16 |"
        in (out / "results.md").read_text()
    )
    r = run_fila("bench", "--compare", str(out / "results.json"), str(out / "results.json"))
    assert r.returncode == 0 and "| 1.000 |" in r.stdout


def _result(backend: str, vision_ms: float, decode_ms: float, e2e_ms: float) -> dict:
    return {
        "backend": backend,
        "precision": "fp32",
        "stages": {"vision": {"p50_ms": vision_ms}},
        "decode": {"128": {"p50_ms": decode_ms}},
        "end_to_end": {"p50_ms": e2e_ms},
    }


def test_compare_counts_figures_outside_the_tolerance(tmp_path):
    from benchmarks.report import compare

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"results": [_result("torch", 100, 10, 1000)]}))
    b.write_text(json.dumps({"results": [_result("torch", 105, 12, 950)]}))
    text = compare(a, b)
    assert "| torch fp32 | end_to_end | 1000.00 | 950.00 | 0.950 |" in text
    assert (
        "2 of 3 p50 figures within 10% of A; largest change 20.0% (torch fp32, decode@128)" in text
    )
    # ratios 1.05, 1.2, 0.95: the median 1.05 is the run's drift; 1.2 is 14.3 % above it
    assert (
        "median B/A 1.050 (the whole run's drift); every figure within 14.3% of that median" in text
    )


def test_steady_allocator_reaches_child_processes_and_keeps_the_users_setting(monkeypatch):
    import os
    import subprocess
    import sys

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    show = "import os; print(os.environ.get('MALLOC_MMAP_THRESHOLD_'), os.environ['MALLOC_TRIM_THRESHOLD_'])"
    with steady_allocator():
        seen = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True).stdout
    assert seen.split() == [STEADY_MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"], "12345"]
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ  # put back as it was
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"


def test_power_of_a_column_adds_energy_and_tokens_over_its_rounds():
    from benchmarks.machine import TegraStats, merge_power

    rounds = []
    for mw, gr3d, seconds, tokens in ((10_000, 50, 2.0, 40), (20_000, 90, 1.0, 10)):
        stats = TegraStats()
        stats.available, stats.seconds = True, seconds
        stats.samples = [f"RAM 1/2MB EMC_FREQ 30% GR3D_FREQ {gr3d}% VDD_IN {mw}mW/{mw}mW"] * 3
        rounds.append(stats.summary(tokens))
    assert rounds[0]["joules_per_token"] == 10.0 * 2.0 / 40
    merged = merge_power(rounds + [None])
    assert merged["joules"] == 40.0 and merged["tokens"] == 50
    assert merged["joules_per_token"] == 40.0 / 50
    assert merged["avg_power_w"] == 40.0 / 3.0  # time-weighted, not the mean of 10 W and 20 W
    assert merged["gr3d_pct"] == (50 * 2 + 90 * 1) / 3 and merged["emc_pct"] == 30
    assert merge_power([None, None]) is None


def test_vision_ort_script_times_every_form_and_variant(tiny_artifacts, tiny_checkpoint, tmp_path):
    """``benchmarks/vision_ort.py`` (the figures behind opset 20 and int8-cpu) runs end to end:
    both GELU forms agree with PyTorch's ConvNeXt shape, the two attentions agree, and every
    vision stage's ONNX Runtime variants are timed."""
    from benchmarks import vision_ort
    from runtime.manifest import Manifest

    out = tmp_path / "vision_ort.json"
    args = ["--checkpoint", str(tiny_checkpoint), "--artifacts", str(tiny_artifacts)]
    result = vision_ort.main([*args, "--rounds", "1", "--out", str(out)])
    assert set(result["gelu"]["ms"]) == {
        "onnxruntime opset 18",
        "onnxruntime opset 20",
        "pytorch eager",
    }
    assert max(result["gelu"]["max_abs_diff_vs_pytorch"].values()) < 1e-4
    assert result["attention"]["max_abs_diff"] < 1e-4
    assert result["optimizer"]["max_abs_diff"] < 1e-3
    manifest = Manifest.load(tiny_artifacts)
    timed = {(r["stage"], r["variant"]) for r in result["variants"]}
    for stage in [*manifest.vision_chain, "vision"]:
        assert {(stage, v) for v in manifest.variants_for(stage, "onnxruntime")} <= timed
    assert json.loads(out.read_text())["cpu"] == result["cpu"]


def test_memory_scripts_print_each_graph_run_and_the_vision_forms(tiny_artifacts, capsys):
    """``phase_memory``: a row per graph run with its peak; ``vision_per_run``: the three fp16
    vision forms with the same features."""
    from benchmarks import phase_memory, vision_per_run

    if not os.access(phase_memory.CLEAR_REFS, os.W_OK):
        pytest.skip("needs a writable /proc/self/clear_refs (Linux) to reset the peak")

    assert phase_memory.main(["--artifacts", str(tiny_artifacts), "--precision", "fp16"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "graph" not in line]
    assert {r.split(" | ")[0][2:] for r in rows} >= {"vit.0", "projector", "embed", "decoder_gqa"}

    def number(text: str) -> float:
        return float(text.split()[0].replace(",", ""))

    peaks = [number(r.split(" | ")[3]) for r in rows]
    assert number(out.rsplit("run peak: ", 1)[1]) == max(peaks)
    assert max(peaks) > number(out.split("loaded: ", 1)[1])  # a run holds more than the load
    assert vision_per_run.main(["--artifacts", str(tiny_artifacts), "--rounds", "1"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if "per-run" in line]
    assert len(table) == 2 and all(
        float(line.split(" | ")[3].rstrip(" |")) < 5e-3 for line in table
    )


def test_startup_script_times_both_starts(tiny_artifacts, tmp_path, capsys):
    from conftest import copy_export

    from benchmarks import startup

    art = copy_export(tiny_artifacts, tmp_path / "art")
    assert startup.main(["--artifacts", str(art), "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| hash every file |" in out and "| verification record |" in out
    assert "before the request:" in out
