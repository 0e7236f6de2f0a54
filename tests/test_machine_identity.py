"""Which machine a result came from: CPU identity from /proc/cpuinfo and sysfs (x86 and ARM), and
``fila bench --compare`` saying when two results come from different CPUs."""

from __future__ import annotations

import json

from benchmarks.machine import cpu_identity, same_machine
from benchmarks.report import compare, cpu_line

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse avx avx2 fma avx512f avx512_vnni avx512_bf16

processor\t: 1
vendor_id\t: AuthenticAMD
"""
ORIN = """processor\t: 0
BogoMIPS\t: 62.50
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd42
CPU revision\t: 1
"""


def caches(tmp_path, sizes):
    for i, (level, kind, size) in enumerate(sizes):
        index = tmp_path / f"index{i}"
        index.mkdir()
        (index / "level").write_text(f"{level}\n")
        (index / "type").write_text(f"{kind}\n")
        (index / "size").write_text(f"{size}\n")
    return tmp_path


def test_x86_identity_has_vendor_model_isa_and_caches(tmp_path):
    root = caches(
        tmp_path, [(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "1024K")]
    )
    ident = cpu_identity(EPYC, root)
    assert (ident["vendor"], ident["family"], ident["model"], ident["stepping"]) == (
        "AuthenticAMD",
        "25",
        "17",
        "1",
    )
    assert ident["features"] == ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]
    assert ident["caches"] == {"L1d": "32K", "L1i": "32K", "L2": "1024K"}


def test_arm_identity_has_implementer_part_and_neon(tmp_path):
    ident = cpu_identity(ORIN, tmp_path)
    assert (ident["vendor"], ident["model"]) == ("0x41", "0xd42")  # Arm Ltd, Cortex-A78AE
    assert "asimd" in ident["features"] and "asimddp" in ident["features"]
    assert "sve" not in ident["features"]


def result(tmp_path, name, machine):
    stage = {"p50_ms": 10.0}
    row = {"backend": "onnxruntime", "precision": "fp32", "stages": {"vision": stage}}
    row |= {"decode": {}, "end_to_end": {"p50_ms": 100.0}}
    path = tmp_path / name
    path.write_text(json.dumps({"machine": machine, "results": [row]}))
    return path


def test_compare_says_when_two_results_come_from_different_cpus(tmp_path):
    epyc = {"cpu": "AMD EPYC", "cores": 2, "cpu_identity": cpu_identity(EPYC, tmp_path)}
    other = {**epyc, "cpu_identity": {**epyc["cpu_identity"], "features": ["avx2", "fma"]}}
    assert same_machine(epyc, dict(epyc)) and not same_machine(epyc, other)
    same = compare(result(tmp_path, "a.json", epyc), result(tmp_path, "b.json", epyc))
    assert "Different machines" not in same and "the whole run's drift" in same
    apart = compare(result(tmp_path, "a.json", epyc), result(tmp_path, "c.json", other))
    assert "Different machines" in apart and "the machines' ratio" in apart
    assert "avx512_vnni" in cpu_line(epyc) and "not recorded" in cpu_line({})
