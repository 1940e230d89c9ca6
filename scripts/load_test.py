#!/usr/bin/env python3
"""Load test for `kiln serve` on loopback: streamed completions from N concurrent clients for a fixed time.

    python3 scripts/load_test.py URL [--model NAME] [--clients 1,4,16,32] [--seconds 20] [--max-tokens 32] [--json]

For each client count it reports the requests completed, errors, aggregate generated tokens per second, and the
p50/p95 time to first token (from sending the request to the first streamed text). Every client sends greedy
requests back to back over the standard library's HTTP client; a request that does not end with `data: [DONE]` and
a finish_reason counts as an error. Exits non-zero if any request failed.
"""
import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
]


def one_request(host, port, model, prompt, max_tokens):
    """Returns (time to first token in seconds, completion tokens); raises on any failure."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    conn = http.client.HTTPConnection(host, port, timeout=120)
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"status {response.status}: {response.read()[:200]!r}")
    first, tokens, finished, done = None, 0, False, False
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(chunk["error"])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk["choices"]:
            if choice.get("text") and first is None:
                first = time.perf_counter() - started
            finished = finished or choice.get("finish_reason") is not None
    conn.close()
    if not (done and finished):
        raise RuntimeError("the stream ended without a finish_reason and [DONE]")
    return (first if first is not None else time.perf_counter() - started), tokens


def run_level(host, port, model, clients, seconds, max_tokens):
    deadline = time.perf_counter() + seconds
    lock = threading.Lock()
    ttfts, tokens, errors = [], [0], []

    def client(index):
        i = index
        while time.perf_counter() < deadline:
            try:
                ttft, n = one_request(host, port, model, PROMPTS[i % len(PROMPTS)], max_tokens)
                with lock:
                    ttfts.append(ttft)
                    tokens[0] += n
            except Exception as e:  # every failure is counted and reported
                with lock:
                    errors.append(str(e))
            i += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    ttfts.sort()
    pct = lambda p: ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] if ttfts else float("nan")
    return {
        "clients": clients,
        "requests": len(ttfts),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "generated_tok_s": tokens[0] / elapsed,
        "ttft_p50_ms": 1000 * (statistics.median(ttfts) if ttfts else float("nan")),
        "ttft_p95_ms": 1000 * pct(0.95),
        "seconds": elapsed,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None)
    parser.add_argument("--clients", default="1,4,16,32")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print one JSON object per level instead of a table")
    args = parser.parse_args()
    url = urllib.parse.urlparse(args.url)
    levels = [int(c) for c in args.clients.split(",")]
    if not args.json:
        print("| clients | requests | errors | generated tok/s | TTFT p50 (ms) | TTFT p95 (ms) |")
        print("| --- | --- | --- | --- | --- | --- |")
    failed = False
    for clients in levels:
        r = run_level(url.hostname, url.port or 80, args.model, clients, args.seconds, args.max_tokens)
        failed = failed or r["errors"] > 0
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"| {clients} | {r['requests']} | {r['errors']} | {r['generated_tok_s']:.1f} | "
                  f"{r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} |", flush=True)
        if r["first_error"]:
            print(f"first error at {clients} clients: {r['first_error']}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
