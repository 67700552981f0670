"""Serving throughput: ``gptlab serve`` with 16 clients at once against the same requests one at a time,
and against the servers a user would otherwise pick, under the same load.

A random llama model (the "small" shape of decode.py, with a TinyWorld tokenizer) is written to a
temporary folder, and every server is started on it as its own process, as a user starts it:

- ``gptlab serve --max-batch 16`` (continuous batching), sent the requests 16 at once and one at a time;
- ``serve`` (the default peer): ``transformers serve FOLDER``, transformers' own OpenAI server, 16 at
  once; it runs one ``generate`` at a time on one thread. ``serve-cb`` adds its ``--continuous-batching``
  (paged attention);
- ``loop``: transformers' ``generate`` behind a small FastAPI app, one request at a time (the
  server a user writes in 30 lines; concurrent ``generate`` calls would only fight for the cores).

Each request is a streamed chat completion (greedy, 128 new tokens) whose user message holds 1 to 8
TinyWorld biographies, so prompt lengths differ. Reported: generated tokens per second (counted from
``usage``), time to first token and inter-token latency (gaps between streamed chunks) at p50 and p99,
medians of interleaved repeats with latencies pooled over them, and whether the replies agree.

    python benchmarks/serve_throughput.py
    python benchmarks/serve_throughput.py --peers serve,serve-cb,loop --repeats 1
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device_name, result_line
from gptlab.model import GPT, ModelConfig
from gptlab.tokenizer import Tokenizer
from gptlab.world.facts import biographies, build_world
from gptlab.world.presets import PRESETS

SHAPE = dict(block_size=1024, n_layer=8, n_head=8, n_embd=512)  # decode.py's "small", on this tokenizer
PEERS = {
    "serve": "transformers serve",
    "serve-cb": "transformers serve --continuous-batching",
    "loop": "transformers generate loop",
}
STARTUP_TIMEOUT_S = 300
# A hang guard, not a limit: a server that answers one request at a time sends nothing to the last of
# 16 clients until the other 15 are done, many minutes on a loaded 2-core machine.
REQUEST_TIMEOUT_S = 3600


@dataclass
class Reply:
    """One streamed request, timed from the moment it was sent."""

    text: str = ""
    tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # seconds after sending, one per content chunk

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


def write_model(folder: Path) -> tuple[list[str], int]:
    """A random model with a tokenizer trained on TinyWorld biographies: the biographies, the parameter count."""
    texts = biographies(build_world(PRESETS["quick"], random.Random(0)), 1, random.Random(0))
    tokenizer = Tokenizer.train(texts, vocab_size=2048)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, **SHAPE))
    model.save_pretrained(folder, tokenizer=tokenizer)
    return texts, model.num_params()


def chat_request(model: str, text: str, new_tokens: int) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def stream_chat(port: int, body: dict) -> Reply:
    """Send one streamed chat completion and time each chunk of text as it arrives."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    reply = Reply()
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        piece = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
        if piece:
            reply.chunk_times.append(time.perf_counter() - start)
            reply.text += piece
        if chunk.get("usage"):
            reply.tokens = chunk["usage"]["completion_tokens"]
    connection.close()
    return reply


def run_load(port: int, bodies: list[dict], at_once: bool) -> tuple[float, list[Reply]]:
    """Wall seconds for all requests, sent together (one thread each) or one after another."""
    if not at_once:
        start = time.perf_counter()
        replies = [stream_chat(port, body) for body in bodies]
        return time.perf_counter() - start, replies
    replies: list[Reply | Exception] = [None] * len(bodies)
    ready = threading.Barrier(len(bodies) + 1)

    def client(i: int) -> None:
        ready.wait()
        try:
            replies[i] = stream_chat(port, bodies[i])
        except Exception as error:  # reported below, with the others' results
            replies[i] = error

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    failed = [r for r in replies if isinstance(r, Exception)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(bodies)} requests failed, the first: {failed[0]}")
    return seconds, replies


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(command: list[str], port: int, log: Path) -> subprocess.Popen:
    """Start a server process and wait until its /health answers."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{' '.join(command)} did not answer /health in {STARTUP_TIMEOUT_S} s")


def server_command(kind: str, folder: Path, port: int, clients: int) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if kind == "gptlab":
        serve = ["serve", "--model", f"bench={folder}", "--port", str(port), "--max-batch", str(clients)]
        return [sys.executable, "-m", "gptlab", *serve]
    if kind == "loop":
        return [sys.executable, __file__, "--serve-loop", str(folder), "--port", str(port)]
    cb = ["--continuous-batching"] if kind == "serve-cb" else []
    return [str(bin_dir / "transformers"), "serve", str(folder), "--port", str(port), "--device", "cpu", *cb]


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


@dataclass
class Runs:
    """What one contender measured over the repeats."""

    rates: list[float] = field(default_factory=list)  # generated tokens per second, one per repeat
    replies: list[Reply] = field(default_factory=list)  # every repeat's replies
    first: list[Reply] = field(default_factory=list)  # the first repeat's, in request order

    def add(self, seconds: float, replies: list[Reply]) -> None:
        self.rates.append(sum(r.tokens or len(r.chunk_times) for r in replies) / seconds)
        self.replies += replies
        self.first = self.first or replies

    def row(self, name: str) -> str:
        ttft = [r.chunk_times[0] for r in self.replies if r.chunk_times]
        gaps = [gap for r in self.replies for gap in r.gaps]
        return (
            f"  {name:52} {statistics.median(self.rates):>8.1f} tok/s   TTFT p50 {percentile(ttft, 50):6.2f} s "
            f"p99 {percentile(ttft, 99):6.2f} s   ITL p50 {1e3 * percentile(gaps, 50):6.1f} ms "
            f"p99 {1e3 * percentile(gaps, 99):7.1f} ms"
        )


def agreement(ours: list[Reply], theirs: list[Reply]) -> str:
    same = sum(a.text == b.text for a, b in zip(ours, theirs))
    counts = sorted({r.tokens for r in theirs})
    return f"{same}/{len(ours)} replies identical to gptlab's one at a time, tokens per reply {counts}"


def measure(args, folder: Path, logs: Path) -> None:
    texts, params = write_model(folder)
    clients, new_tokens = args.clients, args.new_tokens
    prompts = [" ".join(texts[8 * i : 8 * i + 1 + i % 8]) for i in range(clients)]  # 1 to 8 biographies each
    tokenizer = Tokenizer.from_pretrained(folder)
    lengths = [len(tokenizer.apply_chat_template([{"role": "user", "content": p}], True)) for p in prompts]
    kinds = ["gptlab", *args.peers]
    ports = {kind: free_port() for kind in kinds}
    models = {kind: "bench" if kind == "gptlab" else str(folder) for kind in kinds}
    contenders = {("gptlab", True): Runs(), ("gptlab", False): Runs()}
    contenders.update({(peer, True): Runs() for peer in args.peers})
    processes = []
    try:
        for kind in kinds:
            processes.append(start_server(server_command(kind, folder, ports[kind], clients), ports[kind], logs / kind))
            stream_chat(ports[kind], chat_request(models[kind], prompts[0], 8))  # warm-up, untimed
        print(
            f"model: llama {SHAPE['n_layer']} layers x {SHAPE['n_embd']}, {params / 1e6:.1f}M parameters, fp32 on "
            f"{device_name('cpu')}; {clients} requests, prompts {min(lengths)}-{max(lengths)} "
            f"tokens, {new_tokens} new tokens, greedy; {args.repeats} interleaved repeats (tok/s medians, "
            f"latencies pooled); torch {torch.__version__}"
        )
        for repeat in range(1, args.repeats + 1):
            for (kind, at_once), runs in contenders.items():
                bodies = [chat_request(models[kind], p, new_tokens) for p in prompts]
                runs.add(*run_load(ports[kind], bodies, at_once))
                # Printed now, so a run cut short still shows what it measured.
                print(f"  repeat {repeat}: {name_of(kind, at_once, clients)}: {runs.rates[-1]:.1f} tok/s", flush=True)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:  # busy generating for a client that is gone
                process.kill()
                process.wait()
    report(contenders, clients)


def name_of(kind: str, at_once: bool, clients: int) -> str:
    return f"{PEERS.get(kind, 'gptlab serve')}, " + (f"{clients} at once" if at_once else "one at a time")


def report(contenders: dict[tuple[str, bool], Runs], clients: int) -> None:
    names = {key: name_of(*key, clients) for key in contenders}
    for key, runs in contenders.items():
        print(runs.row(names[key]))
    ours = statistics.median(contenders["gptlab", True].rates)
    sequential = contenders["gptlab", False]
    for key, runs in contenders.items():
        if key == ("gptlab", True):
            continue
        print(f"gptlab serve, {clients} at once, is {ours / statistics.median(runs.rates):.2f}x {names[key]}")
        print(f"  ({agreement(sequential.first, runs.first)})")
    print(f"  (gptlab at once: {agreement(sequential.first, contenders['gptlab', True].first)})")
    for (kind, at_once), runs in contenders.items():
        if (kind, at_once) != ("gptlab", True):
            benchmark = f"serve_{clients}_clients_vs_{kind if kind != 'gptlab' else 'sequential'}"
            print(result_line(benchmark, ours, statistics.median(runs.rates), "tok/s", "cpu"))


def serve_loop(folder: str, port: int) -> None:
    """The peer a user writes: transformers' generate behind FastAPI, one request at a time, streamed."""
    import transformers
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    one_at_a_time = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    def chat(body: dict) -> StreamingResponse:
        inputs = tokenizer.apply_chat_template(
            body["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        streamer = transformers.TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        produced = []

        def generate() -> None:
            with one_at_a_time, torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=body["max_tokens"], do_sample=False, streamer=streamer)
            produced.append(out.size(1) - inputs["input_ids"].size(1))

        worker = threading.Thread(target=generate)
        worker.start()

        def events():
            for text in streamer:
                if text:
                    yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': text}}]})}\n\n"
            worker.join()
            yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': produced[0]}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", default="serve", help=f"comma-separated, of {', '.join(PEERS)}")
    parser.add_argument("--serve-loop", metavar="FOLDER", help=argparse.SUPPRESS)  # the loop peer's process
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_loop:
        return serve_loop(args.serve_loop, args.port)
    args.peers = [p for p in args.peers.split(",") if p]
    if not set(args.peers) <= set(PEERS):
        parser.error(f"--peers takes {', '.join(PEERS)}, got {','.join(args.peers)}")
    with tempfile.TemporaryDirectory() as tmp:
        folder, logs = Path(tmp) / "model", Path(tmp)
        measure(args, folder, logs)


if __name__ == "__main__":
    main()
