"""`fila bench` produces its files and fields (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json

from conftest import run_fila


def test_bench_writes_json_markdown_and_plots(tiny_artifacts, tiny_checkpoint, tmp_path):
    out = tmp_path / "bench"
    r = run_fila("bench", "--artifacts", str(tiny_artifacts), "--checkpoint", str(tiny_checkpoint),
                 "--backends", "torch,onnxruntime", "--precisions", "fp32,fp16", "--runs", "2",
                 "--warmup", "1", "--decode-steps", "2", "--contexts", "16,64", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "results.json").read_text())
    labels = [(x["backend"], x["precision"]) for x in data["results"]]
    assert labels == [("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16")]
    for result in data["results"]:
        assert {"vision", "prefill", "decode_step", "vit", "cvfm", "convnext"} <= set(
            result["stages"]
        )
        assert set(result["decode"]) == {"16", "64"}
        assert result["decode"]["16"]["roofline_ratio"] > 0
        assert result["speedup_vs_torch"]["end_to_end"] > 0
    assert data["machine"]["measured_bandwidth_gb_s"] > 0
    assert (out / "latency_per_stage.png").stat().st_size > 1000
    assert (out / "decode_vs_context.png").stat().st_size > 1000
    assert "| decode_step |" in (out / "results.md").read_text()
    r = run_fila("bench", "--compare", str(out / "results.json"), str(out / "results.json"))
    assert r.returncode == 0 and "| 1.000 |" in r.stdout
