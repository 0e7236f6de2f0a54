"""``fila bench --serve URL``: load on a running ``fila serve`` with OpenAI's client.

For each concurrency: ``requests`` streamed chat completions (the bundled examples' images and
questions, sent inline), ``concurrency`` at a time. Per level: requests/s, aggregate and
per-request tokens/s (over each whole request), time to the first streamed chunk p50/p99 (the
server streams from the first token whose text is complete; with random weights whose tokens are
padding ids that can be the end), errors by status, and the server's
resident memory (its ``/metrics``) after the first 20 requests and at the end. ``malformed_every``
makes every k-th request malformed (it must come back as a 4xx). Only this machine's own
addresses are load-tested: a load generator pointed at someone else's server is a flood.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from fila_export.demo import EXAMPLES
from runtime.errors import FilaError


def check_local(url: str) -> None:
    """Refuse a URL whose host is not loopback or one of this machine's addresses."""
    host = urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise FilaError(f"--serve {url}: cannot resolve {host!r} ({exc})") from None
    own = {"127.0.0.1", "::1"}
    try:
        own |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except socket.gaierror:
        pass
    if not all(ipaddress.ip_address(a).is_loopback or a in own for a in addresses):
        raise FilaError(
            f"--serve {url}: {host} is not this machine; run the load generator on the board "
            "or against 127.0.0.1"
        )


def workload(n: int = 8) -> list[tuple[str, str]]:
    """(data URL, question) pairs from the bundled examples."""
    rows = [json.loads(x) for x in (EXAMPLES / "questions.jsonl").read_text().splitlines()[:n]]
    out = []
    for row in rows:
        data = base64.b64encode(Path(EXAMPLES / row["image"]).read_bytes()).decode()
        out.append(("data:image/png;base64," + data, row["question"]))
    return out


def server_rss_mb(url: str) -> float | None:
    import httpx

    text = httpx.get(url.rstrip("/") + "/metrics", timeout=10).text
    found = re.search(r"^process_resident_memory_bytes ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) / 2**20 if found else None


def one_request(client, model: str, item, max_tokens: int, malformed: bool) -> dict:
    import openai

    url, question = item
    if malformed:
        url = "data:image/png;base64,@@broken@@"
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    t0 = time.perf_counter()
    first, tokens = None, 0
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices and first is None:  # the server streams from the first token's
                first = time.perf_counter()  # text (random weights: maybe only at the end)
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except openai.APIStatusError as exc:
        return {"status": exc.status_code, "malformed": malformed}
    end = time.perf_counter()
    out = {"status": 200, "malformed": malformed, "tokens": tokens, "seconds": end - t0}
    if first is not None:
        out["ttft_s"] = first - t0
    out["tok_s"] = tokens / (end - t0)  # over the whole request, as the client sees it
    return out


def run_level(url, model, concurrency, requests, max_tokens, malformed_every) -> dict:
    import openai

    client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key="none", max_retries=0)
    items = workload()
    rss_after_20: list[float | None] = []
    lock = threading.Lock()
    done = [0]

    def task(i: int) -> dict:
        bad = bool(malformed_every) and i % malformed_every == malformed_every - 1
        result = one_request(client, model, items[i % len(items)], max_tokens, bad)
        with lock:
            done[0] += 1
            if done[0] == 20:
                rss_after_20.append(server_rss_mb(url))
        return result

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(task, range(requests)))
    wall = time.perf_counter() - t0
    return summarize(results, concurrency, wall, rss_after_20[0] if rss_after_20 else None, url)


def summarize(results: list[dict], concurrency: int, wall: float, rss_20, url: str) -> dict:
    ok = [r for r in results if r["status"] == 200 and not r["malformed"]]
    ttfts = sorted(r["ttft_s"] for r in ok if "ttft_s" in r)
    rates = [r["tok_s"] for r in ok]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    lost = sum(1 for r in results if not r["malformed"] and r["status"] != 200)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "statuses": statuses,
        "good_requests_lost": lost,
        "malformed_not_4xx": sum(
            1 for r in results if r["malformed"] and not 400 <= r["status"] < 500
        ),
        "requests_per_s": len(ok) / wall,
        "aggregate_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "per_request_tokens_per_s_p50": statistics.median(rates) if rates else None,
        "ttft_p50_s": ttfts[len(ttfts) // 2] if ttfts else None,
        "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] if ttfts else None,
        "server_rss_mb_after_20": rss_20,
        "server_rss_mb_end": server_rss_mb(url),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| concurrency | requests | req/s | aggregate tok/s | per-request tok/s p50 (whole "
        "request) | first chunk p50 s | first chunk p99 s | statuses | good lost | server RSS MB (after 20 / end) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def f(key, digits=2, r=r):
            return "-" if r[key] is None else f"{r[key]:.{digits}f}"

        lines.append(
            f"| {r['concurrency']} | {r['requests']} | {f('requests_per_s')} | "
            f"{f('aggregate_tokens_per_s', 1)} | {f('per_request_tokens_per_s_p50', 1)} | "
            f"{f('ttft_p50_s')} | {f('ttft_p99_s')} | {r['statuses']} | "
            f"{r['good_requests_lost']} | {f('server_rss_mb_after_20', 0)} / "
            f"{f('server_rss_mb_end', 0)} |"
        )
    return "\n".join(lines)


def run_load(
    url: str,
    concurrencies: list[int],
    requests: int,
    max_tokens: int = 32,
    malformed_every: int = 0,
) -> dict:
    import httpx

    check_local(url)
    try:
        model = httpx.get(url.rstrip("/") + "/v1/models", timeout=10).json()["data"][0]["id"]
    except httpx.HTTPError as exc:
        raise FilaError(f"--serve {url}: no fila serve answers there ({exc})") from None
    rows = [run_level(url, model, c, requests, max_tokens, malformed_every) for c in concurrencies]
    return {"url": url, "model": model, "max_tokens": max_tokens, "levels": rows}
