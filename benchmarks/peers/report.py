"""The side-by-side results as Markdown: one row per engine and precision, then ours/peer."""

from __future__ import annotations


def markdown(out: dict) -> str:
    s = out["settings"]
    contexts = s["contexts"]
    head = [f"decode tok/s @{c}" for c in contexts]
    head += [f"prefill {s['prefill_tokens']} (ms)", "peak RSS (MB)", "greedy tokens vs ours"]
    lines = [
        f"Threads {s['threads']}, {s['decode_steps']} decode steps per context, "
        f"{s['rounds']} rounds (fresh processes taking turns); medians.",
        "",
        "| engine | precision | " + " | ".join(head) + " |",
        "|---|---|" + "---:|" * len(head),
    ]
    for label, col in out["columns"].items():
        check = out["tokens"].get(label)
        same = (
            "(ours)"
            if check is None
            else ("same" if check["same_tokens"] else f"{100 * check['agreement']:.0f} % agree")
        )
        cells = [f"{col['decode_tok_s'][str(c)]:.1f}" for c in contexts]
        cells += [f"{col['prefill_ms']:.0f}", f"{col['peak_rss_mb']:.0f}", same]
        lines.append(f"| {col['engine']} | {col['precision']} | " + " | ".join(cells) + " |")
    lines += ["", "| ours / peer | " + " | ".join(next(iter(out["ratios"].values()), {})) + " |"]
    lines.append("|---|" + "---:|" * len(next(iter(out["ratios"].values()), {})))
    for name, row in out["ratios"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |")
    lines += [
        "",
        "decode and prefill_speed: >1 means ours is faster; peak_rss: <1 means ours is smaller.",
    ]
    loops = {k: c for k, c in out["columns"].items() if "loop_share" in c}
    for label, col in loops.items():
        lines.append(
            f"- {label}: the decode loop's own cost {col['loop_outside_sessions_ms']:.2f} ms "
            f"a step ({100 * col['loop_share']:.1f} % of a step)"
        )
    return "\n".join(lines)
