"""``fila doctor``: check the machine the runtime is about to run on; print each problem and its fix."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# operator tables of fila check-trt, listed without importing onnx (a board may lack it)
TRT_TABLES = Path(__file__).resolve().parents[1] / "tensorrt" / "ops"


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "doctor", help="check this machine (JetPack, CUDA, TensorRT, ONNX Runtime, power, memory)"
    )
    p.add_argument("--json", help="also write the findings and the facts as JSON here")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from runtime.doctor import diagnose, gather, report

    facts = gather()
    findings = diagnose(facts, tuple(sorted(p.stem for p in TRT_TABLES.glob("*.json"))))
    for finding in findings:
        print(finding.line())
    result = report(findings)
    if args.json:
        Path(args.json).write_text(json.dumps(result | {"facts": asdict(facts)}, indent=2))
    print(f"{result['errors']} error(s)" if result["errors"] else "no errors")
    return 1 if result["errors"] else 0
