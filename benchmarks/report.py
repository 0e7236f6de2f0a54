"""Benchmark results as Markdown tables, PNG plots, and the ratio between two result files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks.machine import same_machine
from benchmarks.targets import STAGE_GROUPS


def _label(r: dict) -> str:
    """``backend precision``; ONNX Runtime names its GPU providers (``onnxruntime on cuda``) and
    the portable decoder graph (its default is ``decoder_gqa``)."""
    portable = r["backend"] == "onnxruntime" and r.get("decoder_stage") == "decoder"
    gpu = [
        p for p in r.get("providers", []) if p.lower().removesuffix("executionprovider") != "cpu"
    ]
    on = f" on {'+'.join(gpu)}" if gpu else ""
    return f"{r['backend']}{on} {r['precision']}" + (" (portable decoder)" if portable else "")


def cpu_line(m: dict) -> str:
    """The CPU's identity: what decides which kernels ran (results without it say so)."""
    ident = m.get("cpu_identity")
    if not ident:
        return "CPU identity: not recorded (a result from before it was)."
    where = "/".join(str(ident.get(k, "?")) for k in ("family", "model", "stepping"))
    caches = ", ".join(f"{k} {v}" for k, v in ident.get("caches", {}).items())
    features = " ".join(ident.get("features", [])) or "none of the listed"
    return (
        f"CPU: {ident.get('vendor', '?')} family/model/stepping {where}; ISA: {features}; "
        f"caches: {caches or 'unknown'}."
    )


def script_header(result: dict) -> list[str]:
    """A benchmark script's Markdown opening: the command that ran and the CPU it ran on."""
    return [f"`{result['command']}`", "", cpu_line({"cpu_identity": result["cpu"]})]


def table(header: list[str], rows: list[list]) -> list[str]:
    """Markdown table lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def publish(result: dict, render, out: Path | None) -> None:
    """Print a benchmark script's Markdown; with ``out``, write the JSON there and the
    Markdown beside it (``.md``)."""
    text = render(result)
    print(text)
    if out:
        out.write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(text + "\n")


def _speedup(r: dict) -> str:
    value = r.get("speedup_vs_torch", {}).get("end_to_end")
    return "- (no torch column)" if value is None else f"{value:.2f}x"


def _rss(r: dict) -> str:
    if r.get("peak_rss_scope") != "target":  # older files, or no per-target window here
        return f"{r['peak_rss_mb']:.0f} (process peak)"
    return f"{r['peak_rss_mb']:.0f} (+{r['peak_rss_mb'] - r['rss_at_start_mb']:.0f})"


def _vision(r: dict) -> str:
    v = r.get("vision") or {}
    if not v:
        return "-"
    return v["variant"] + (f" ({v['cosine']:.4f})" if v.get("cosine") is not None else "")


def _memory(r: dict) -> str:
    """The memory terms measured in the column's process (``fila plan`` predicts them)."""
    m = r.get("memory_mb") or {}
    keys = ("loaded", "after_vision", "after_prefill")
    return " / ".join(f"{m[k]:.0f}" for k in keys) if all(k in m for k in keys) else "-"


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = [
        f"# Benchmark: {Path(out['artifacts']).name}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; GPU: {m['gpu'] or 'none'}; "
        f"measured memory bandwidth {m['measured_bandwidth_gb_s']:.1f} GB/s. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items() if v)}.",
        cpu_line(m),
        f"Settings: {out['settings']}. Image: `{Path(out['image']).name}`.",
        "",
        "## Per-stage latency, p50 ms (p90 / p99)",
        "",
        "| stage | " + " | ".join(_label(r) for r in out["results"]) + " |",
        "|---|" + "---|" * len(out["results"]),
    ]
    for g in STAGE_GROUPS:
        cells = []
        for r in out["results"]:
            s = r["stages"].get(g)
            cells.append(f"{s['p50_ms']:.2f} ({s['p90_ms']:.2f} / {s['p99_ms']:.2f})" if s else "-")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Request level",
        "",
        "| | " + " | ".join(_label(r) for r in out["results"]) + " |",
        "|---|" + "---|" * len(out["results"]),
    ]
    rows = {
        "time to first token (ms)": lambda r: f"{r['ttft_ms']:.1f}",
        "end-to-end p50 (ms, fixed answer)": lambda r: (
            f"{r['end_to_end']['p50_ms']:.1f} ({r['end_to_end']['answer_tokens']} tok)"
        ),
        "speed-up vs torch (end to end)": _speedup,
        "threads (read back)": lambda r: str(r.get("threads_used") or "-"),
        "vision graph (cosine vs fp32, from calibration)": _vision,
        "peak RSS (MB; + over the RSS before loading)": _rss,
        "RSS after loading / vision / prefill (MB)": _memory,
        "decode weights read per token (MB)": lambda r: f"{r['decode_weight_bytes'] / 2**20:.0f}",
    }
    for ctx in out["settings"]["contexts"]:
        rows[f"decode tok/s @ {ctx}"] = lambda r, c=str(ctx): (
            f"{r['decode'][c]['tokens_per_s']:.1f}"
        )
        rows[f"roofline ratio @ {ctx}"] = lambda r, c=str(ctx): (
            f"{r['decode'][c]['roofline_ratio']:.0%}"
        )
    for name, fn in rows.items():
        lines.append(f"| {name} | " + " | ".join(fn(r) for r in out["results"]) + " |")
    lines += [
        "",
        "Roofline: bytes read per decode token (weights + KV at that context) x tokens/s, "
        "divided by the measured memory bandwidth.",
    ]
    power = [r for r in out["results"] if r.get("power")]
    if power:
        lines += [
            "",
            "## Jetson power",
            "",
            "| target | avg W | J/token | GR3D % | EMC % |",
            "|---|---|---|---|---|",
        ]
        for r in power:
            p = r["power"]
            lines.append(
                f"| {_label(r)} | {p['avg_power_w']:.1f} | {p.get('joules_per_token', 0):.3f} | {_pct(p['gr3d_pct'])} | {_pct(p['emc_pct'])} |"
            )
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def plots(out: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = out["results"]
    labels = [_label(r) for r in results]

    def stacked(ax):
        bottom = [0.0] * len(results)
        for g in ("preprocess", "vision", "prefill", "decode_step"):
            vals = [r["stages"].get(g, {}).get("p50_ms", 0.0) for r in results]
            ax.bar(labels, vals, bottom=bottom, label=g)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.tick_params(axis="x", labelrotation=15)
        ax.set_ylabel("p50 latency (ms)")

    def throughput(ax):
        for r, label in zip(results, labels, strict=True):
            ctxs = sorted(int(c) for c in r["decode"])
            ax.plot(
                ctxs, [r["decode"][str(c)]["tokens_per_s"] for c in ctxs], marker="o", label=label
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode tokens/s")

    figures = [
        (
            "latency_per_stage.png",
            (8, 4.5),
            stacked,
            "Latency per stage (vision = fused graph; one decode step)",
        ),
        ("decode_vs_context.png", (7, 4.5), throughput, "Decode throughput vs context"),
    ]
    paths = []
    for name, size, draw, title in figures:
        fig, ax = plt.subplots(figsize=size)
        draw(ax)
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        paths.append(folder / name)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def compare(a_path: str | Path, b_path: str | Path, tolerance: float = 0.10) -> str:
    """B / A ratios of p50 latencies (< 1: B is faster) for every target and stage both have, and
    how many moved by more than ``tolerance`` (the run-to-run spread of one command)."""
    a, b = json.loads(Path(a_path).read_text()), json.loads(Path(b_path).read_text())
    index = {_label(r): r for r in a["results"]}
    rows = []
    for r in b["results"]:
        base = index.get(_label(r))
        if not base:
            continue
        for g, s in r["stages"].items():
            if g in base["stages"]:
                rows.append((_label(r), g, base["stages"][g]["p50_ms"], s["p50_ms"]))
        for c, d in r["decode"].items():
            if c in base["decode"]:
                rows.append((_label(r), f"decode@{c}", base["decode"][c]["p50_ms"], d["p50_ms"]))
        rows.append(
            (_label(r), "end_to_end", base["end_to_end"]["p50_ms"], r["end_to_end"]["p50_ms"])
        )
    lines = [f"# {b_path} vs {a_path} (ratio of p50 ms, B/A)", ""]
    ma, mb = a.get("machine", {}), b.get("machine", {})
    apart_machines = not same_machine(ma, mb)
    if apart_machines:
        lines += [
            f"**Different machines**: A ran on {ma.get('cpu')} ({ma.get('cores')} cores, "
            f"{cpu_line(ma)}), B on {mb.get('cpu')} ({mb.get('cores')} cores, {cpu_line(mb)}). "
            "The ratios compare the machines; they are "
            "not a drift of one machine.",
            "",
        ]
    lines += ["| target | stage | A ms | B ms | B/A |", "|---|---|---|---|---|"]
    lines += [f"| {t} | {g} | {x:.2f} | {y:.2f} | {y / x:.3f} |" for t, g, x, y in rows]
    if rows:
        change = [(abs(y / x - 1), t, g) for t, g, x, y in rows]
        within = sum(c <= tolerance for c, _, _ in change)
        worst = max(change)
        lines += [
            "",
            f"{within} of {len(rows)} p50 figures within {tolerance:.0%} of A; "
            f"largest change {worst[0]:.1%} ({worst[1]}, {worst[2]})",
        ]
        # a shared machine running a whole run faster or slower moves every figure together: the
        # median ratio shows that drift, and the spread around it what is left to the figures
        drift = statistics.median(y / x for _, _, x, y in rows)
        apart = max(abs(y / x / drift - 1) for _, _, x, y in rows)
        lines.append(
            f"median B/A {drift:.3f} "
            + ("(the machines' ratio); " if apart_machines else "(the whole run's drift); ")
            + "every figure within "
            f"{apart:.1%} of that median"
        )
    return "\n".join(lines) + "\n"
