"""``fila serve`` on a free loopback port, called with the real ``openai`` client: answers equal
``fila run``'s on the demo model's bundled examples (plain and streamed), every malformed request
is a 4xx naming the problem while the server keeps answering, a full queue is a 429, and the
image-feature and prefix caches change nothing in the answers."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from fila_export.demo import EXAMPLES
from runtime.pipeline import FilaPipeline
from runtime.reuse import Reuse
from runtime.serve.app import create_app
from runtime.serve.engine import Settings

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytestmark = pytest.mark.board

MODEL = "fila-demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread on 127.0.0.1; stops when the test's fixture ends."""

    def __init__(self, app) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def reference(demo_artifacts):
    """The pipeline ``fila run`` uses, on its own (no reuse)."""
    pipe = FilaPipeline.from_artifacts(demo_artifacts, threads=1)
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def server(demo_artifacts, tmp_path_factory):
    pipe = FilaPipeline.from_artifacts(demo_artifacts, threads=1)
    settings = Settings(max_queue=4, max_image_bytes=200_000, image_root=EXAMPLES)
    srv = Server(create_app(pipe, MODEL, settings))
    yield srv
    srv.stop()
    pipe.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def examples(n: int = 3) -> list[dict]:
    lines = (EXAMPLES / "questions.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def ask(image_url: str, question: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": image_url}}]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


def test_answers_equal_fila_run_plain_and_streamed(client, reference):
    for ex in examples():
        image = EXAMPLES / ex["image"]
        expected = reference.generate(str(image), ex["question"], max_new_tokens=16)
        messages = ask(data_url(image), ex["question"])
        plain = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=16, temperature=0
        )
        assert plain.choices[0].message.content == expected.text
        assert plain.usage.completion_tokens == len(expected.token_ids)
        assert plain.usage.prompt_tokens == len(expected.prompt_token_ids)
        pieces = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
        assert text == expected.text


def test_a_path_under_the_image_root_is_the_same_image(client, reference):
    ex = examples(1)[0]
    expected = reference.generate(str(EXAMPLES / ex["image"]), ex["question"], max_new_tokens=8)
    out = client.chat.completions.create(
        model=MODEL, messages=ask(ex["image"], ex["question"]), max_tokens=8
    )
    assert out.choices[0].message.content == expected.text


def malformed_cases(image: Path) -> list[tuple[object, int, str]]:
    good = {"model": MODEL, "messages": ask(data_url(image), "What is the number?")}
    bad_b64 = ask("data:image/png;base64,@@not-base64@@", "Hi")
    not_image = ask("data:image/png;base64," + base64.b64encode(b"hello").decode(), "Hi")
    huge = ask("data:image/png;base64," + "A" * 400_000, "Hi")
    return [
        (b"{not json", 400, "not valid JSON"),
        ({"model": MODEL}, 400, "messages"),
        ({**good, "messages": bad_b64}, 400, "base64"),
        ({**good, "messages": not_image}, 400, "image"),
        ({**good, "messages": huge}, 413, "limit"),
        ({**good, "messages": ask("https://example.com/a.png", "Hi")}, 400, "remote"),
        ({**good, "messages": ask("../../../etc/passwd", "Hi")}, 400, "outside"),
        ({**good, "model": "gpt-4o"}, 404, "not served here"),
        ({**good, "temperature": 7}, 400, "temperature"),
        ({**good, "n": 3}, 400, "n"),
        ({**good, "max_tokens": 10**6}, 400, "context"),
        ({**good, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ]


def test_every_malformed_request_is_a_4xx_naming_it_and_the_server_keeps_serving(server, client):
    image = EXAMPLES / examples(1)[0]["image"]
    for body, status, words in malformed_cases(image):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(server.url + "/v1/chat/completions", content=content, timeout=60)
        assert r.status_code == status, (body if isinstance(body, bytes) else words, r.text)
        assert words.lower() in r.json()["error"]["message"].lower(), r.text
        good = client.chat.completions.create(
            model=MODEL, messages=ask(data_url(image), "What is the number?"), max_tokens=4
        )
        assert good.choices[0].message.content is not None


def test_an_answer_slower_than_the_disconnect_poll_is_still_answered(server, monkeypatch):
    """The handler polls for a client that left while it waits for the first event. Before
    Python 3.11 (JetPack 6 has 3.10) ``asyncio.wait_for`` raises ``asyncio.TimeoutError``, not
    the built-in ``TimeoutError``: every request slower than the poll ended in a 500."""
    import runtime.serve.app as app

    monkeypatch.setattr(app, "DISCONNECT_POLL_S", 0.001)  # every first event comes later
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    for stream in (False, True):
        r = httpx.post(server.url + "/v1/chat/completions", json=body | {"stream": stream})
        assert r.status_code == 200, r.text
    assert "[DONE]" in r.text


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "fila_requests_total",
        "fila_queue_length",
        "fila_time_to_first_token_seconds_bucket",
        "fila_time_per_output_token_seconds_bucket",
        "fila_generated_tokens_total",
    ):
        assert name in text


def test_a_full_queue_is_a_429_with_retry_after(demo_artifacts):
    pipe = FilaPipeline.from_artifacts(demo_artifacts, threads=1)
    release = threading.Event()
    answer = pipe.answer

    def held(*args, **kwargs):
        release.wait(30)
        return answer(*args, **kwargs)

    pipe.answer = held
    srv = Server(create_app(pipe, MODEL, Settings(max_queue=1)))
    try:
        image = EXAMPLES / examples(1)[0]["image"]
        body = {"model": MODEL, "messages": ask(data_url(image), "What?"), "max_tokens": 2}
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            results = []

            def post():
                results.append(http.post("/v1/chat/completions", json=body).status_code)

            first = [threading.Thread(target=post) for _ in range(2)]  # one runs, one waits
            for t in first:
                t.start()
                time.sleep(0.5)
            refused = http.post("/v1/chat/completions", json=body)
            assert refused.status_code == 429
            assert int(refused.headers["Retry-After"]) >= 1
            release.set()
            for t in first:
                t.join(60)
        assert results == [200, 200]
    finally:
        release.set()
        srv.stop()
        pipe.close()


def test_a_follow_up_reuses_the_image_and_prefix_with_the_same_answer(reference):
    ex = examples(1)[0]
    image = EXAMPLES / ex["image"]
    reuse = Reuse()
    first = reference.generate(str(image), ex["question"], max_new_tokens=8, reuse=reuse)
    history = [(ex["question"], first.text)]
    again = reference.generate(
        str(image), "Say it again.", max_new_tokens=8, history=history, reuse=reuse
    )
    fresh = reference.generate(str(image), "Say it again.", max_new_tokens=8, history=history)
    assert again.token_ids == fresh.token_ids
    assert again.timings["vision_s"] == 0.0 and reuse.features.hits == 1
    assert again.timings["cached_positions"] > len(first.prompt_token_ids)


def test_the_load_generator_counts_good_and_malformed_requests(server):
    from benchmarks import serve_load

    out = serve_load.run_load(server.url, [1, 2], requests=4, max_tokens=4, malformed_every=2)
    for level in out["levels"]:
        assert level["statuses"] == {"200": 2, "400": 2}
        assert level["good_requests_lost"] == 0 and level["malformed_not_4xx"] == 0
        assert level["ttft_p50_s"] > 0 and level["server_rss_mb_end"] > 50
    assert "| 2 | 4 |" in serve_load.markdown(out["levels"])


def test_the_load_generator_refuses_other_machines():
    from benchmarks.serve_load import check_local
    from runtime.errors import FilaError

    with pytest.raises(FilaError, match="not this machine"):
        check_local("http://192.0.2.7:8000")  # TEST-NET-1: never this machine
    check_local("http://127.0.0.1:8000")


def test_a_client_that_leaves_cancels_its_generation_and_frees_the_worker(tiny_artifacts):
    import re

    pipe = FilaPipeline.from_artifacts(tiny_artifacts, threads=1)
    embed = pipe.embed

    def slow_embed(ids):  # 20 ms a token: 400 tokens would take 8 s
        time.sleep(0.02)
        return embed(ids)

    pipe.embed = slow_embed
    srv = Server(create_app(pipe, MODEL, Settings()))
    try:
        image = EXAMPLES / examples(1)[0]["image"]
        body = {"model": MODEL, "messages": ask(data_url(image), "Hi"), "max_tokens": 400}
        body["stop"] = None
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=1.0)
        deadline = time.monotonic() + 5
        metrics = ""
        while time.monotonic() < deadline:
            metrics = httpx.get(srv.url + "/metrics").text
            if re.search(r"^fila_cancelled_requests_total 1\.0$", metrics, re.M):
                break
            time.sleep(0.1)
        assert re.search(r"^fila_cancelled_requests_total 1\.0$", metrics, re.M), metrics
        tokens = float(re.search(r"^fila_generated_tokens_total (\S+)$", metrics, re.M).group(1))
        assert 0 < tokens < 400  # stopped early, not run to the end
        quick = {**body, "max_tokens": 2}
        r = httpx.post(srv.url + "/v1/chat/completions", json=quick, timeout=30)
        assert r.status_code == 200  # the worker is free for the next request
    finally:
        srv.stop()
        pipe.close()
