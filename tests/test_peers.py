"""Side by side with other engines (``fila bench --peers``): the LLM folder the peers convert from,
onnxruntime-genai's greedy tokens against ours, llama.cpp's tools driven as the run drives them
(a stand-in ``llama-bench``; the real llama.cpp when ``FILA_LLAMA_CPP`` points at a build), the
decode loop's own cost, and the report."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.peers import genai, llama_cpp, report, run
from benchmarks.peers.gguf_convert import is_gpt2_byte_level
from benchmarks.peers.ours import OurLLM
from runtime.errors import FilaError

SETTINGS = run.PeerSettings(
    threads=1,
    contexts=(16, 40),
    decode_steps=4,
    prefill_tokens=24,
    rounds=1,
    check_tokens=6,
    vocab=0,
)


def settings_for(artifacts: Path) -> run.PeerSettings:
    vocab, eos = run.vocab_and_eos(artifacts)
    return run.PeerSettings(**{**SETTINGS.__dict__, "vocab": vocab, "eos": eos})


def test_llm_folder_is_the_checkpoints_llm_for_transformers(tiny_checkpoint, tmp_path):
    import transformers

    from fila_export.model.checkpoint import load_checkpoint
    from fila_export.model.llm_folder import write_llm_folder

    folder = write_llm_folder(tiny_checkpoint, tmp_path / "llm")
    llm = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = load_checkpoint(tiny_checkpoint)
    model = model[0] if isinstance(model, tuple) else model
    ids = torch.tensor([[1, 5, 9, 17, 33, 60]])
    with torch.no_grad():
        want = model.language_model(input_ids=ids).logits
        got = llm(ids).logits
    assert torch.equal(got, want)
    assert is_gpt2_byte_level(folder)
    assert (folder / "tokenizer.json").is_file()


@pytest.mark.skipif(not genai.installed(), reason="onnxruntime-genai not installed (peers extra)")
def test_genai_gives_our_greedy_tokens_and_the_run_reports_both(
    tiny_artifacts, tiny_checkpoint, tmp_path
):
    s = settings_for(tiny_artifacts)
    out = run.run_peers(tiny_artifacts, tiny_checkpoint, [genai.NAME], ["fp32"], s, tmp_path)
    check = out["tokens"][f"{genai.NAME} fp32"]
    assert check["same_tokens"], check
    assert check["prompts"] == len(run.PROMPT_LENGTHS)
    cols = out["columns"]
    assert set(cols) == {"fila fp32", f"{genai.NAME} fp32"}
    for col in cols.values():
        assert set(col["decode_tok_s"]) == {"16", "40"}
        assert all(v > 0 for v in col["decode_tok_s"].values())
        assert col["prefill_ms"] > 0 and col["peak_rss_mb"] > 50
    ratio = out["ratios"][f"fila/{genai.NAME} fp32"]
    assert set(ratio) == {"decode@16", "decode@40", "prefill_speed", "peak_rss"}
    assert 0 <= cols["fila fp32"]["loop_share"] < 1
    table = report.markdown(out)
    assert "| onnxruntime-genai | fp32 |" in table and "same" in table


def test_ours_decode_loop_cost_is_measured_outside_the_sessions(tiny_artifacts):
    ours = OurLLM(tiny_artifacts, "fp32", 1)
    loop = ours.loop_overhead(list(range(4, 20)), 8)
    assert loop["steps"] == 7
    assert 0 < loop["outside_sessions_ms"] < loop["step_ms"]
    assert ours.greedy(list(range(4, 20)), 5) == ours.greedy(list(range(4, 20)), 5)


def fake_llama_tree(root: Path, records: list[dict]) -> Path:
    """A llama.cpp tree whose ``llama-bench`` prints ``records`` as llama-bench's JSON does."""
    (root / "build" / "bin").mkdir(parents=True)
    (root / "convert_hf_to_gguf.py").write_text("")
    for tool in llama_cpp.TOOLS:
        path = root / "build" / "bin" / tool
        path.write_text(f"#!/bin/sh\nsleep 0.3\necho '{json.dumps(records)}'\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return root


def test_llama_bench_runs_are_read_with_their_own_peak(tmp_path):
    records = [{"n_depth": 128, "avg_ts": 50.0}, {"n_depth": 512, "avg_ts": 40.0}]
    root = fake_llama_tree(tmp_path / "llama.cpp", records)
    assert llama_cpp.locate(root) == root
    command = llama_cpp.bench_command(root, tmp_path / "m.gguf", 1, {"n": 64, "d": [128, 512]})
    assert command[command.index("-d") + 1] == "128,512"
    assert command[command.index("-n") + 1] == "64" and command[command.index("-t") + 1] == "1"
    got, peak_mb = llama_cpp.run_bench(command)
    assert got == records
    assert 0 < peak_mb < 50  # the shell's own peak, not this (large) process's


def test_llama_rounds_convert_to_seconds_and_ratios_point_the_stated_way(tmp_path):
    records = [{"n_depth": 16, "avg_ts": 50.0}, {"n_depth": 40, "avg_ts": 40.0}]
    root = fake_llama_tree(tmp_path / "llama.cpp", records)
    system = run.System(llama_cpp.NAME, "fp32", str(tmp_path / "m.gguf"))
    got = run.llama_round(system, SETTINGS, root)
    assert got["prefill_s"] == [SETTINGS.prefill_tokens / 50.0]  # tokens / (tokens/s)
    assert got["decode_s"] == {"16": [1 / 50.0], "40": [1 / 40.0]}
    theirs = run.summarize(system, [got, got], SETTINGS)
    assert theirs["decode_tok_s"] == {"16": 50.0, "40": 40.0}
    ours_round = {"prefill_s": [0.1], "decode_s": {"16": [0.01, 0.03], "40": [0.05]}}
    ours_round["peak_rss_mb"] = 100.0
    ours = run.summarize(run.System(run.OURS, "fp32", "x"), [ours_round], SETTINGS)
    assert ours["decode_tok_s"] == {"16": 50.0, "40": 20.0}  # a round's steps / its seconds
    ratios = run.ratios({"fila fp32": ours, "llama.cpp fp32": theirs}, SETTINGS)
    row = ratios["fila/llama.cpp fp32"]
    assert row["decode@16"] == 1.0 and row["decode@40"] == 0.5  # >1: ours faster
    assert row["prefill_speed"] == round(theirs["prefill_ms"] / 100.0, 3)  # >1: ours faster


def test_missing_peers_and_unknown_names_are_named(tiny_artifacts, tiny_checkpoint, tmp_path):
    (tmp_path / "half").mkdir()
    assert llama_cpp.locate(tmp_path / "half") is None
    with pytest.raises(FilaError, match="not installed: llama.cpp.*FILA_LLAMA_CPP"):
        run.run_peers(
            tiny_artifacts,
            tiny_checkpoint,
            ["llama.cpp"],
            ["fp32"],
            SETTINGS,
            tmp_path,
            tmp_path / "half",
        )
    with pytest.raises(FilaError, match="unknown peer"):
        run.run_peers(tiny_artifacts, tiny_checkpoint, ["vllm"], ["fp32"], SETTINGS, tmp_path)
    with pytest.raises(FilaError, match="'w8'.*fila calibrate"):  # before any peer is converted
        run.run_peers(tiny_artifacts, tiny_checkpoint, [genai.NAME], ["w8"], SETTINGS, tmp_path)
    assert not (tmp_path / "llm").exists()
    zero = run.PeerSettings(**{**SETTINGS.__dict__, "rounds": 0})
    with pytest.raises(FilaError, match="at least 1"):
        run.run_peers(tiny_artifacts, tiny_checkpoint, [genai.NAME], ["fp32"], zero, tmp_path)
    long = run.PeerSettings(**{**SETTINGS.__dict__, "contexts": (10**6,)})
    with pytest.raises(FilaError, match="positions but the export's decoder holds"):
        run.run_peers(tiny_artifacts, tiny_checkpoint, [genai.NAME], ["fp32"], long, tmp_path)


@pytest.mark.skipif(
    not llama_cpp.installed(), reason="no llama.cpp build ($FILA_LLAMA_CPP): benchmarks/README.md"
)
def test_llama_cpp_gives_our_greedy_tokens(tiny_artifacts, tiny_checkpoint, tmp_path):
    s = settings_for(tiny_artifacts)
    root = llama_cpp.locate(os.environ[llama_cpp.ENV])
    systems = run.prepare(
        tiny_artifacts, tiny_checkpoint, [llama_cpp.NAME], ["fp32"], tmp_path, root
    )
    checks = run.check_tokens(systems, s, root)["checks"]
    assert checks[f"{llama_cpp.NAME} fp32"]["same_tokens"]


def test_converted_files_are_remade_for_another_checkpoint(tmp_path):
    a, b, work = tmp_path / "a", tmp_path / "b", tmp_path / "work"
    for ck in (a, b):
        ck.mkdir()
        (ck / "model.safetensors").write_bytes(b"x" * (3 if ck == a else 4))
    run.fresh_work_folder(work, a)
    (work / "gguf").mkdir()
    run.fresh_work_folder(work, a)
    assert (work / "gguf").is_dir()  # same source: kept
    run.fresh_work_folder(work, b)
    assert not (work / "gguf").exists()  # another checkpoint: made again


def test_answers_are_compared_up_to_the_first_eos():
    assert run.until_eos([5, 7, 2, 0, 0], (2,)) == [5, 7, 2]
    assert run.until_eos([5, 7, 9], (2,)) == [5, 7, 9]


def test_token_ids_are_fixed_and_in_range():
    a = run.token_ids(50, 100, seed=3)
    assert a == run.token_ids(50, 100, seed=3)
    assert min(a) >= 4 and max(a) < 100 and np.unique(a).size > 10
