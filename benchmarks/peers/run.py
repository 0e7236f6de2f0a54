"""The side-by-side run: prepare each peer's files from the checkpoint's LLM, check greedy tokens
against ours, then time every system in rounds of fresh processes that take turns."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.machine import machine_info
from benchmarks.peers import genai, llama_cpp
from runtime.errors import FilaError
from runtime.memory import peak_rss_bytes

OURS = "fila"
PEERS = (llama_cpp.NAME, genai.NAME)
PROMPT_LENGTHS = (9, 33, 120)


@dataclass(frozen=True)
class PeerSettings:
    threads: int
    contexts: tuple[int, ...]
    decode_steps: int
    prefill_tokens: int
    rounds: int
    check_tokens: int
    vocab: int
    eos: tuple[int, ...] = ()


@dataclass(frozen=True)
class System:
    """One column: an engine at a precision, and the file or folder it loads."""

    engine: str
    precision: str
    path: str

    @property
    def label(self) -> str:
        return f"{self.engine} {self.precision}"


def vocab_and_eos(artifacts: str | Path) -> tuple[int, tuple[int, ...]]:
    """The export's vocabulary size and EOS ids (from its tokenizer files, their one source)."""
    from runtime.manifest import Manifest
    from runtime.pipeline import prompt_builder

    manifest = Manifest.load(artifacts)
    eos = tuple(prompt_builder(manifest).eos_token_ids)
    return manifest.model["text"]["vocab_size"], eos


def token_ids(length: int, vocab: int, seed: int) -> list[int]:
    """Fixed ids every system is fed (token text plays no part: no tokenizer is compared)."""
    return [int(i) for i in np.random.default_rng(seed).integers(4, vocab, length)]


def source_stamp(checkpoint: Path) -> dict:
    """What the converted files were made from: the checkpoint's config and each weight file's
    name, size and modification time (cheap next to hashing gigabytes)."""
    files = sorted(p for p in checkpoint.iterdir() if p.suffix in (".safetensors", ".json"))
    return {
        "checkpoint": str(checkpoint.resolve()),
        "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
    }


def fresh_work_folder(work: Path, checkpoint: Path) -> None:
    """Keep the peers' converted files only while they come from this very checkpoint."""
    stamp_path, stamp = work / "source.json", source_stamp(checkpoint)
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return
    if work.is_dir():
        for name in ("llm", "gguf", *(f"genai-{p}" for p in genai.PRECISIONS), "genai-cache"):
            shutil.rmtree(work / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    stamp_path.write_text(json.dumps(stamp, indent=2))


def prepare(
    artifacts: Path, checkpoint: Path, peers: list[str], precisions: list[str], work: Path, root
) -> list[System]:
    """Our column and each peer's files at each precision, made from the checkpoint's LLM."""
    from fila_export.model.llm_folder import write_llm_folder

    fresh_work_folder(work, checkpoint)
    llm = work / "llm"
    if not (llm / "config.json").is_file():
        write_llm_folder(checkpoint, llm)
    systems = []
    for precision in precisions:
        systems.append(System(OURS, precision, str(artifacts)))
        if genai.NAME in peers:
            folder = genai.build(llm, work / f"genai-{precision}", precision)
            systems.append(System(genai.NAME, precision, str(folder)))
        if llama_cpp.NAME in peers:
            gguf = llama_cpp.convert(llm, work / "gguf", root, precision)
            systems.append(System(llama_cpp.NAME, precision, str(gguf)))
    return systems


def load(system: System, s: PeerSettings, root: Path | None):
    """The engine of ``system`` in this process (each engine's own loader)."""
    if system.engine == OURS:
        from benchmarks.peers.ours import OurLLM

        return OurLLM(system.path, system.precision, s.threads)
    if system.engine == genai.NAME:
        return genai.GenaiLLM(Path(system.path), s.threads)
    context = max(PROMPT_LENGTHS) + s.check_tokens + 8
    return llama_cpp.LlamaCppLLM(Path(system.path), root, s.threads, context)


def until_eos(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    """The answer a user sees: up to and including the first EOS (engines differ in what they
    do after it: genai stops, llama-cpp-python's ``generate`` and our fixed-length loop go on)."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def greedy_in_process(system: System, s: PeerSettings, root: Path | None) -> list[list[int]]:
    engine = load(system, s, root)
    return [
        until_eos(engine.greedy(token_ids(n, s.vocab, seed), s.check_tokens), s.eos)
        for seed, n in enumerate(PROMPT_LENGTHS)
    ]


def timed_in_process(system: System, s: PeerSettings) -> dict:
    """One round of ours or genai in this (fresh) process: a warm-up, a prefill of
    ``prefill_tokens`` from empty, then ``decode_steps`` steps after each context."""
    engine = load(system, s, None)
    prompt = token_ids(s.prefill_tokens, s.vocab, 7)
    engine.prefill_s(prompt)  # warm-up
    out = {"prefill_s": [engine.prefill_s(prompt)], "decode_s": {}}
    for ctx in s.contexts:
        samples = engine.decode_s(token_ids(ctx, s.vocab, ctx), s.decode_steps + 2)
        out["decode_s"][str(ctx)] = samples[2:]  # the first steps warm up
    if system.engine == OURS:
        out["loop"] = engine.loop_overhead(token_ids(s.contexts[0], s.vocab, 1), s.decode_steps)
    out["peak_rss_mb"] = peak_rss_bytes() / 2**20
    return out


def llama_round(system: System, s: PeerSettings, root: Path) -> dict:
    """One round of llama-bench: prefill from empty, then token generation after each context
    (two processes; the peak is the larger)."""
    gguf = Path(system.path)
    pre, pre_peak = llama_cpp.run_bench(
        llama_cpp.bench_command(root, gguf, s.threads, {"p": s.prefill_tokens})
    )
    gen, gen_peak = llama_cpp.run_bench(
        llama_cpp.bench_command(root, gguf, s.threads, {"n": s.decode_steps, "d": s.contexts})
    )
    return {
        "prefill_s": [s.prefill_tokens / pre[0]["avg_ts"]],
        "decode_s": {str(r["n_depth"]): [1 / r["avg_ts"]] for r in gen},
        "peak_rss_mb": max(pre_peak, gen_peak),
        "llama_bench": {"build_commit": pre[0].get("build_commit"), "cpu": pre[0].get("cpu_info")},
    }


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a spawned process: no allocator state, thread pools or memory carried
    over from the engines measured before it."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def check_tokens(systems: list[System], s: PeerSettings, root: Path | None) -> dict:
    """Greedy answers of each system on the same ids, against ours at the same precision: the
    fraction of positions that agree, and whether every answer is the same."""
    answers = {sys.label: in_fresh_process(greedy_in_process, sys, s, root) for sys in systems}
    checks = {}
    for system in systems:
        if system.engine == OURS:
            continue
        ours, theirs = answers[f"{OURS} {system.precision}"], answers[system.label]
        agree = sum(
            a == b for x, y in zip(ours, theirs, strict=True) for a, b in zip(x, y, strict=False)
        )
        total = sum(max(len(x), len(y)) for x, y in zip(ours, theirs, strict=True))
        checks[system.label] = {
            "same_tokens": ours == theirs,
            "agreement": agree / total,
            "prompts": len(ours),
            "tokens_each": s.check_tokens,
        }
    return {"answers": answers, "checks": checks}


def time_rounds(systems: list[System], s: PeerSettings, root: Path | None) -> dict:
    """Every system once per round, each in a fresh process, the order rotating by round."""
    rounds: dict[str, list[dict]] = {sys.label: [] for sys in systems}
    for r in range(s.rounds):
        order = systems[r % len(systems) :] + systems[: r % len(systems)]
        for system in order:
            if system.engine == llama_cpp.NAME:
                result = llama_round(system, s, root)
            else:
                result = in_fresh_process(timed_in_process, system, s)
            rounds[system.label].append(result)
            print(f"round {r + 1}/{s.rounds}: {system.label}", flush=True)
    return rounds


def summarize(system: System, rounds: list[dict], s: PeerSettings) -> dict:
    """Medians over the rounds' pooled samples: decode tok/s per context, prefill ms, peak RSS."""
    # each round's tok/s over its steps (what llama-bench reports per repetition), then the
    # median over rounds: the same statistic for every engine
    decode = {
        ctx: statistics.median(len(x) / sum(x) for x in (r["decode_s"][str(ctx)] for r in rounds))
        for ctx in s.contexts
    }
    out = {
        "engine": system.engine,
        "precision": system.precision,
        "decode_tok_s": {str(c): round(v, 2) for c, v in decode.items()},
        "prefill_ms": round(
            1000 * statistics.median([x for r in rounds for x in r["prefill_s"]]), 1
        ),
        "peak_rss_mb": round(statistics.median([r["peak_rss_mb"] for r in rounds]), 1),
        "rounds": len(rounds),
    }
    if "loop" in rounds[0]:
        loops = [r["loop"] for r in rounds]
        out["loop_outside_sessions_ms"] = round(
            statistics.median(x["outside_sessions_ms"] for x in loops), 3
        )
        out["loop_share"] = round(statistics.median(x["share"] for x in loops), 4)
    if "llama_bench" in rounds[0]:
        out["llama_bench"] = rounds[0]["llama_bench"]
    return out


def ratios(columns: dict[str, dict], s: PeerSettings) -> dict:
    """Ours over each peer at the same precision: decode tok/s (>1: ours faster), prefill speed
    (peer ms / our ms, >1: ours faster) and peak RSS (<1: ours smaller)."""
    out = {}
    for label, col in columns.items():
        if col["engine"] == OURS:
            continue
        ours = columns[f"{OURS} {col['precision']}"]
        out[f"{OURS}/{label}"] = {
            **{
                f"decode@{c}": round(ours["decode_tok_s"][str(c)] / col["decode_tok_s"][str(c)], 3)
                for c in s.contexts
            },
            "prefill_speed": round(col["prefill_ms"] / ours["prefill_ms"], 3),
            "peak_rss": round(ours["peak_rss_mb"] / col["peak_rss_mb"], 3),
        }
    return out


def check_inputs(
    artifacts: str | Path, peers: list[str], precisions: list[str], settings: PeerSettings, root
) -> None:
    """Everything a run needs, checked before any conversion: known and installed peers, counts
    of at least one, precisions the export has, and contexts its decoder holds."""
    from runtime.manifest import Manifest
    from runtime.variants import choose_decoder, precision_spec, stage_variant

    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise FilaError(f"unknown peer(s) {unknown}; known: {', '.join(PEERS)}")
    ready = {llama_cpp.NAME: root is not None, genai.NAME: genai.installed()}
    missing = [p for p in peers if not ready[p]]
    if llama_cpp.NAME in peers and root is not None and not llama_cpp.bindings_installed():
        missing.append("llama-cpp-python (the greedy-token check)")
    if missing:
        raise FilaError(
            f"peer(s) not installed: {', '.join(missing)} (how to install each: "
            "benchmarks/README.md, 'Peers'; llama.cpp: --llama-cpp DIR or $FILA_LLAMA_CPP)"
        )
    s = settings
    if min(s.rounds, s.decode_steps, s.prefill_tokens, s.check_tokens, *s.contexts) < 1:
        raise FilaError(
            "--rounds, --decode-steps, --prefill-tokens, --answer-tokens and every --contexts "
            "value must be at least 1"
        )
    manifest = Manifest.load(artifacts)
    decoder = choose_decoder(manifest, "onnxruntime")
    for precision in precisions:  # each names a decoder variant of the export
        stage_variant(manifest, precision_spec(manifest, precision), decoder, "onnxruntime")
    room = manifest.stage(decoder)["axes"]["total"]["max"]
    need = max(max(s.contexts) + s.decode_steps + 3, s.prefill_tokens + 1)
    if need > room:
        raise FilaError(
            f"the run needs {need} positions but the export's decoder holds {room}: "
            "lower --contexts / --decode-steps / --prefill-tokens"
        )


def run_peers(
    artifacts: str | Path,
    checkpoint: str | Path,
    peers: list[str],
    precisions: list[str],
    settings: PeerSettings,
    work: str | Path,
    llama_cpp_dir: str | Path | None = None,
) -> dict:
    """The whole side-by-side run; ``fp32_same_tokens`` says whether every peer answered as ours
    at fp32 (if not, the figures do not compare the same model)."""
    root = llama_cpp.locate(llama_cpp_dir)
    check_inputs(artifacts, peers, precisions, settings, root)
    systems = prepare(Path(artifacts), Path(checkpoint), peers, precisions, Path(work), root)
    tokens = check_tokens(systems, settings, root)
    rounds = time_rounds(systems, settings, root)
    columns = {sys.label: summarize(sys, rounds[sys.label], settings) for sys in systems}
    fp32 = [c["same_tokens"] for label, c in tokens["checks"].items() if label.endswith(" fp32")]
    return {
        "settings": asdict(settings),
        "machine": machine_info(),
        "columns": columns,
        "ratios": ratios(columns, settings),
        "tokens": tokens["checks"],
        "fp32_same_tokens": all(fp32),
        "raw_rounds": rounds,
    }
