"""Continuous batching on ``decoder_gqa``: rows of different lengths that join and leave decode
exactly as each would alone, and ``fila serve --max-batch`` answers concurrent requests as
``fila run`` does (the demo model, exported with ``--max-batch 4`` by the conftest fixture)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fila_export.demo import EXAMPLES
from runtime.batching import BatchDecoder
from runtime.errors import FilaError
from runtime.pipeline import FilaPipeline
from runtime.serve.app import create_app
from runtime.serve.engine import Settings

pytestmark = pytest.mark.board

ROWS = 4


@pytest.fixture(scope="module")
def pipe(demo_artifacts):
    pipeline = FilaPipeline.from_artifacts(demo_artifacts, threads=1)
    yield pipeline
    pipeline.close()


def solo(pipe, embeds: np.ndarray, steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and each step's logits of one prompt on its own (batch-1 decoder)."""
    dec = pipe.new_decoder(64)
    logits = dec.prefill(embeds, np.ones(embeds.shape[:2], dtype=np.int64))[0]
    tokens, seen = [], [logits.copy()]
    for _ in range(steps - 1):
        tokens.append(int(logits.argmax()))
        logits = dec.decode_one_token(pipe.embed(np.array([[tokens[-1]]])))[0]
        seen.append(logits.copy())
    tokens.append(int(logits.argmax()))
    return tokens, seen


def test_rows_of_different_lengths_join_and_leave_and_decode_as_alone(pipe):
    rng = np.random.default_rng(0)
    steps = 6
    prompts = [pipe.embed(rng.integers(4, 200, (1, n))) for n in (9, 14, 5, 11)]
    expected = [solo(pipe, p, steps) for p in prompts]
    batch = BatchDecoder(pipe.runners[pipe.decoder_stage], pipe.decoder_shape, ROWS, 64)
    joins = {0: [0], 2: [1], 4: [2, 3]}  # step -> prompts joining before it (rows fill in order)
    rows: dict[int, dict] = {}
    got: dict[int, tuple[list[int], list[np.ndarray]]] = {}
    for step in range(40):
        for k in joins.get(step, []):
            row = next(r for r in range(ROWS) if r not in rows)
            logits = batch.prefill(row, prompts[k])
            rows[row] = {"k": k, "tokens": [int(logits.argmax())], "logits": [logits.copy()]}
        for row in [r for r, run in rows.items() if len(run["tokens"]) == steps]:
            run = rows.pop(row)
            got[run["k"]] = (run["tokens"], run["logits"])
            batch.free(row)
        if not rows and step > max(joins):
            break
        active = np.array([r in rows for r in range(ROWS)])
        last = np.array([[rows[r]["tokens"][-1] if r in rows else 0] for r in range(ROWS)])
        logits = batch.step(pipe.embed(last), active)
        for row, run in rows.items():
            run["logits"].append(logits[row].copy())
            run["tokens"].append(int(logits[row].argmax()))
    assert sorted(got) == [0, 1, 2, 3]
    for k, (tokens, logits) in got.items():
        assert tokens == expected[k][0], k
        for a, b in zip(logits, expected[k][1], strict=True):
            np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


def test_an_fp16_decoder_batches_on_an_fp16_cache(tiny_artifacts):
    """The batch buffer takes the graph's cache dtype (fp16 here), rows as they decode alone."""
    pipeline = FilaPipeline.from_artifacts(tiny_artifacts, precision="fp16", threads=1)
    try:
        runner = pipeline.runners[pipeline.decoder_stage]
        batch = BatchDecoder(runner, pipeline.decoder_shape, 2, 32)
        assert batch.cache.buffer.dtype == np.float16
        rng = np.random.default_rng(1)
        prompts = [pipeline.embed(rng.integers(4, 60, (1, n))) for n in (6, 9)]
        firsts = [int(batch.prefill(r, p).argmax()) for r, p in enumerate(prompts)]
        logits = batch.step(pipeline.embed(np.array([[t] for t in firsts])), np.ones(2, bool))
        for r, p in enumerate(prompts):
            tokens, _ = solo(pipeline, p, 2)
            assert [firsts[r], int(logits[r].argmax())] == tokens
    finally:
        pipeline.close()


def test_serve_decodes_concurrent_requests_together_with_fila_runs_answers(demo_artifacts, pipe):
    openai = pytest.importorskip("openai")
    from tests.test_serve import Server, ask, data_url, examples

    cases = examples(3)
    want = [
        pipe.generate(str(EXAMPLES / ex["image"]), ex["question"], max_new_tokens=12).text
        for ex in cases
    ]
    served = FilaPipeline.from_artifacts(demo_artifacts, threads=1)
    srv = Server(create_app(served, "fila-demo", Settings(max_batch=ROWS)))
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    answers: dict[int, str] = {}

    def one(i: int) -> None:
        messages = ask(data_url(EXAMPLES / cases[i]["image"]), cases[i]["question"])
        if i == 0:  # one of them streamed
            pieces = client.chat.completions.create(
                model="fila-demo", messages=messages, max_tokens=12, temperature=0, stream=True
            )
            answers[i] = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
        else:
            out = client.chat.completions.create(
                model="fila-demo", messages=messages, max_tokens=12, temperature=0
            )
            answers[i] = out.choices[0].message.content

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [answers.get(i) for i in range(len(cases))] == want
    finally:
        srv.stop()
        served.close()


def test_max_batch_beyond_what_the_export_takes_is_refused(tiny_artifacts):
    pipeline = FilaPipeline.from_artifacts(tiny_artifacts, threads=1)
    try:
        with pytest.raises(FilaError, match="re-export with fila export --max-batch 4"):
            create_app(pipeline, "tiny", Settings(max_batch=4))
    finally:
        pipeline.close()


def test_batch_decode_benchmark_reports_identical_tokens(demo_artifacts, tmp_path):
    from benchmarks import batch_decode

    out = tmp_path / "batch.json"
    args = ["--artifacts", str(demo_artifacts), "--rows", "1,3", "--context", "20"]
    result = batch_decode.main([*args, "--steps", "5", "--rounds", "1", "--out", str(out)])
    assert [r["rows"] for r in result["rows"]] == [1, 3]
    assert all(r["identical_to_alone"] for r in result["rows"])
    assert result["rows"][0]["vs_one_stream"] == 1.0 and out.with_suffix(".md").is_file()
