"""Where a graph's time goes: ONNX Runtime's profiler, its node times summed per op type over the
last runs of a session (the warm-up and, for a decoder, the prefill left out)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def ms_by_op(events: list[dict], runs: int) -> dict[str, float]:
    """Mean ms per run of each op type over the last ``runs`` ``model_run`` windows, largest
    first, with the runs' own mean wall time as ``(model_run)``."""
    windows = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    )[-runs:]
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if any(start <= e["ts"] <= end for start, end in windows):
            op = e["args"]["op_name"]
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1000 / runs
    out = {k: round(v, 3) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])}
    out["(model_run)"] = round(sum(end - start for start, end in windows) / 1000 / runs, 3)
    return out


def profile(session, run: Callable[[], object], runs: int) -> dict[str, float]:
    """Call ``run`` (which runs ``session``: warm-ups, a prefill) and then read the profile of
    the session's last ``runs`` runs; the session must have been made with ``profile=``."""
    run()
    path = Path(session.end_profiling())
    try:
        return ms_by_op(json.loads(path.read_text()), runs)
    finally:
        path.unlink(missing_ok=True)


def graph_profile(path: Path, feeds: dict, threads: int, runs: int = 1) -> dict[str, float]:
    """One graph run ``runs`` times after a warm-up."""
    from runtime import onnx_io

    session = onnx_io.session(path, threads=threads, profile=path.with_suffix(""))

    def run() -> None:
        for _ in range(runs + 1):
            session.run(None, feeds)

    return profile(session, run, runs)
