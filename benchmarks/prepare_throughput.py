"""Shard-preparation throughput and memory: ``gptlab.data.prepare`` on every core vs the
``tokenizers`` library encoding on one thread.

What is compared, and why:

- ours: ``gptlab.data.prepare`` with ``workers = os.cpu_count()``, the whole job: reading the
  ``.txt`` corpus, tokenizing in a pool of processes, splitting train/val, writing the shards and
  ``meta.json``.
- peer: the raw ``tokenizers.Tokenizer.encode_batch`` over the same documents (already in
  memory, in chunks of the size ``prepare`` sends to a worker) with ``RAYON_NUM_THREADS=1``:
  the tokenizing work alone, on one core. ``encode_batch_fast`` (no offsets, what gptlab calls)
  is timed too and printed.

So ``ours / peer`` is the speed-up that ``prepare`` gets from its cores after paying for I/O,
process start-up and shard writing; ideal is ``os.cpu_count()``. Each side runs in a fresh
subprocess (rayon's pool size is fixed when the library first uses it), interleaved
``ours, peer, ours, peer, ...``; medians. Both sides must produce the same number of tokens
(ours adds one BOS per document). CPU seconds (user + system, workers included) are printed
too: on a shared machine, tokens per CPU second are steadier than tokens per second.

Memory: ``prepare`` streams the corpus, so its memory must not grow with the corpus. It runs on
a corpus and on one ``--memory-scale`` times larger; reported are the peak RSS (the kernel's
``VmHWM``) of the prepare process and of its largest worker, the peak of the whole process
tree's RSS (sampled), and their ratios. (``getrusage``'s ``ru_maxrss`` would mislead here: Linux
carries a parent's high-water mark over fork and exec into the child.)

    python benchmarks/prepare_throughput.py                       # 20 MB corpus; 5 MB vs 50 MB memory
    python benchmarks/prepare_throughput.py --mb 100 --memory-mb 20 --repeats 5

The corpus is generated (pseudo-words with Zipf frequencies, sentences, digits), so no data
is downloaded. This module imports neither torch nor gptlab at the top: ``prepare``'s spawned
workers re-import the main module, and a heavy one would be charged to ours.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- the corpus


def _word_list(rng: random.Random, size: int) -> list[str]:
    """Pseudo-words of 1 to 4 syllables: a vocabulary much larger than the tokenizer's."""
    onsets = [
        "",
        "b",
        "c",
        "d",
        "f",
        "g",
        "h",
        "j",
        "k",
        "l",
        "m",
        "n",
        "p",
        "r",
        "s",
        "t",
        "v",
        "w",
        "st",
        "tr",
        "ch",
        "sh",
        "th",
        "br",
        "pl",
        "gr",
    ]
    vowels = ["a", "e", "i", "o", "u", "ea", "ou", "ai", "io"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st", "ck"]
    words: set[str] = set()
    while len(words) < size:
        syllables = rng.choice((1, 1, 1, 2, 2, 2, 3, 4))
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(syllables)))
    return sorted(words)


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """Write a ``.txt`` corpus of about ``megabytes`` MB (documents separated by blank lines,
    each a few sentences over a Zipf-distributed vocabulary, with numbers); returns documents.
    The vocabulary is the same for every seed; the seed picks the text."""
    language = random.Random(1234)  # one vocabulary for every corpus, so one tokenizer fits them all
    words = _word_list(language, 30_000)
    language.shuffle(words)  # frequency must not follow spelling
    rng = random.Random(seed)
    weights = [1.0 / (rank + 2.7) for rank in range(len(words))]  # Zipf-Mandelbrot, like real text
    target = int(megabytes * 1e6)
    written = documents = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            pool = rng.choices(words, weights, k=20_000)  # drawn in bulk: choices() is the slow part
            cursor = 0
            parts = []
            for _ in range(200):
                sentences = []
                for _ in range(rng.randint(2, 12)):
                    n = rng.randint(4, 18)
                    tokens = pool[cursor : cursor + n]
                    cursor = (cursor + n) % (len(pool) - 20)
                    if rng.random() < 0.15:
                        tokens[rng.randrange(n)] = str(rng.randint(0, 10 ** rng.randint(1, 5)))
                    if n > 8 and rng.random() < 0.4:
                        tokens[rng.randrange(2, n - 1)] += ","
                    sentence = " ".join(tokens)
                    sentences.append(sentence[0].upper() + sentence[1:] + rng.choice(".....?!"))
                parts.append(" ".join(sentences))
            text = "\n\n".join(parts) + "\n\n"
            f.write(text)
            written += len(text.encode("utf-8"))
            documents += len(parts)
    return documents


def train_tokenizer(corpus: Path, out: Path, vocab_size: int, sample_mb: float = 2.0) -> None:
    """A gptlab byte-level BPE tokenizer trained on the corpus's first ``sample_mb`` MB."""
    from gptlab.data import iter_documents
    from gptlab.tokenizer import Tokenizer

    def sample():
        chars = 0
        for doc in iter_documents([corpus]):
            yield doc
            chars += len(doc)
            if chars >= sample_mb * 1e6:
                return

    Tokenizer.train(sample(), vocab_size=vocab_size).save_pretrained(out)


# ----------------------------------------------------------------------------- the two sides (subprocesses)


def _status_mb(pid: int | str, field: str) -> float:
    """A ``VmHWM`` / ``VmRSS`` line of /proc/PID/status in MB (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return 0.0


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from the parent ids in /proc/*/stat."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        found += frontier
    return found


class TreeMemory:
    """Samples the memory of this process and its descendants (the pool's workers) every
    ``interval`` seconds on a thread.

    Peaks come from ``VmHWM``, the kernel's per-process high-water mark, so a sample misses
    nothing but a worker's last ``interval`` before it exits. ``getrusage``'s ``ru_maxrss`` is not
    used: Linux carries the parent's high-water mark over fork and exec, so a child started by a
    big process (this benchmark imports torch) would report the parent's size.
    """

    def __init__(self, interval: float = 0.02):
        self.interval, self.hwm, self.total_peak = interval, {}, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while True:
            pids = _descendants(me)
            for pid in pids:
                self.hwm[pid] = max(self.hwm.get(pid, 0.0), _status_mb(pid, "VmHWM"))
            self.total_peak = max(self.total_peak, sum(_status_mb(p, "VmRSS") for p in [me, *pids]))
            if self._stop.wait(self.interval):
                return


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have exited (the workers)."""
    usages = map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usages)


def child_ours(tokenizer: str, corpus: str, out: str, workers: int, monitor: bool) -> dict:
    """Run prepare; with ``monitor``, sample the memory of the process tree (which costs a little CPU,
    so the throughput runs go without)."""
    from gptlab.data import prepare

    memory = TreeMemory() if monitor else contextlib.nullcontext()
    cpu = _cpu_seconds()
    with memory:
        start = time.perf_counter()
        meta = prepare(tokenizer, [corpus], out, workers=workers, overwrite=True)
        seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "cpu_seconds": _cpu_seconds() - cpu,
        "tokens": sum(s["tokens"] for s in meta["splits"].values()),
        "documents": sum(s["documents"] for s in meta["splits"].values()),
    }
    if monitor:
        result.update(
            rss_self_mb=_status_mb("self", "VmHWM"),
            rss_worker_mb=max(memory.hwm.values(), default=0.0),
            processes=1 + len(memory.hwm),
            rss_tree_mb=memory.total_peak,
        )
    return result


def child_peer(tokenizer: str, corpus: str) -> dict:
    from tokenizers import Tokenizer as HFTokenizer

    from gptlab.data import iter_documents
    from gptlab.data.shards import CHUNK_CHARS, _chunks

    tok = HFTokenizer.from_file(str(Path(tokenizer) / "tokenizer.json"))
    chunks = list(_chunks(iter_documents([corpus])))  # in memory before the clock starts
    tok.encode_batch(chunks[0][:8], add_special_tokens=False)  # start the (one-thread) pool untimed
    result = {"documents": sum(map(len, chunks)), "chunk_chars": CHUNK_CHARS}
    for name in ("encode_batch", "encode_batch_fast"):
        encode = getattr(tok, name)
        cpu, start = time.process_time(), time.perf_counter()
        tokens = sum(len(e.ids) for chunk in chunks for e in encode(chunk, add_special_tokens=False))
        result[name] = {
            "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu,
            "tokens": tokens,
        }
    return result


def run_child(args: list[str], env: dict | None = None) -> dict:
    """Run this script as a child and return the JSON dict it prints last."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    if proc.returncode != 0:
        raise SystemExit(f"child {args[:2]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20, help="throughput corpus size in MB (default 20)")
    parser.add_argument("--vocab", type=int, default=4096, help="tokenizer vocabulary (default 4096)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each side (default 3)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="prepare's workers (default: all cores)")
    parser.add_argument("--memory-mb", type=float, default=5, help="small corpus for the memory check (default 5)")
    parser.add_argument("--memory-scale", type=float, default=10, help="the large corpus is this many times larger")
    parser.add_argument("--child", choices=("ours", "peer"), help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--monitor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "ours":
        print(json.dumps(child_ours(args.tokenizer, args.input, args.out, args.workers, args.monitor)))
        return
    if args.child == "peer":
        print(json.dumps(child_peer(args.tokenizer, args.input)))
        return

    sys.path.insert(0, str(ROOT))
    from benchmarks.common import result_line

    with tempfile.TemporaryDirectory(prefix="gptlab-prepare-bench-") as tmp:
        tmp = Path(tmp)
        sizes = {"throughput": args.mb, "small": args.memory_mb, "large": args.memory_mb * args.memory_scale}
        start = time.perf_counter()
        for seed, (name, mb) in enumerate(sizes.items()):
            write_corpus(tmp / name / "corpus.txt", mb, seed=seed)
        listed = ", ".join(f"{name} {mb:g} MB" for name, mb in sizes.items())
        print(f"corpora {listed} written in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        train_tokenizer(tmp / "throughput" / "corpus.txt", tmp / "tok", args.vocab)
        print(f"tokenizer (vocab {args.vocab}) trained in {time.perf_counter() - start:.1f} s")

        def ours(name: str, monitor: bool = False) -> dict:
            return run_child(
                [
                    "--child",
                    "ours",
                    "--tokenizer",
                    str(tmp / "tok"),
                    "--input",
                    str(tmp / name / "corpus.txt"),
                    "--out",
                    str(tmp / name / "shards"),
                    "--workers",
                    str(args.workers),
                ]
                + ["--monitor"] * monitor
            )

        def peer(name: str) -> dict:
            return run_child(
                ["--child", "peer", "--tokenizer", str(tmp / "tok"), "--input", str(tmp / name / "corpus.txt")],
                env={"RAYON_NUM_THREADS": "1"},
            )

        runs: dict[str, list[dict]] = {"ours": [], "peer": []}
        for _ in range(args.repeats):
            runs["ours"].append(ours("throughput"))
            runs["peer"].append(peer("throughput"))
        tokens_ours = runs["ours"][0]["tokens"]
        documents = runs["ours"][0]["documents"]
        tokens_peer = runs["peer"][0]["encode_batch"]["tokens"]
        if tokens_ours != tokens_peer + documents or runs["peer"][0]["encode_batch_fast"]["tokens"] != tokens_peer:
            raise SystemExit(
                f"token counts disagree: prepare {tokens_ours:,} = {tokens_peer:,} + {documents:,} BOS expected"
            )
        seconds = {
            "ours": statistics.median(r["seconds"] for r in runs["ours"]),
            "encode_batch": statistics.median(r["encode_batch"]["seconds"] for r in runs["peer"]),
            "encode_batch_fast": statistics.median(r["encode_batch_fast"]["seconds"] for r in runs["peer"]),
        }
        cpu = {
            "ours": statistics.median(r["cpu_seconds"] for r in runs["ours"]),
            "encode_batch": statistics.median(r["encode_batch"]["cpu_seconds"] for r in runs["peer"]),
            "encode_batch_fast": statistics.median(r["encode_batch_fast"]["cpu_seconds"] for r in runs["peer"]),
        }
        tps = {name: tokens_peer / s for name, s in seconds.items()}  # same tokens; BOS ids not counted
        mb = sizes["throughput"]
        print(
            f"\nthroughput: {mb:g} MB, {documents:,} documents, {tokens_peer:,} tokens (+{documents:,} BOS), "
            f"median of {args.repeats}"
        )
        print(f"{'':44}{'seconds':>9}{'tok/s':>12}{'MB/s':>8}{'CPU s':>8}{'tok/CPU s':>12}")
        rows = [
            (f"gptlab prepare, {args.workers} workers (whole job)", "ours"),
            ("tokenizers encode_batch, 1 thread", "encode_batch"),
            ("tokenizers encode_batch_fast, 1 thread", "encode_batch_fast"),
        ]
        for label, key in rows:
            print(
                f"{label:44}{seconds[key]:9.2f}{tps[key]:12,.0f}{mb / seconds[key]:8.2f}{cpu[key]:8.2f}"
                f"{tokens_peer / cpu[key]:12,.0f}"
            )
        print(
            f"peer CPU time / wall time: {cpu['encode_batch'] / seconds['encode_batch']:.2f} "
            f"(below 1.00: the core was shared with other work)"
        )
        print(
            f"speed-up over one thread: {tps['ours'] / tps['encode_batch']:.2f}x (encode_batch), "
            f"{tps['ours'] / tps['encode_batch_fast']:.2f}x (encode_batch_fast); ideal {args.workers}x"
        )
        print(
            f"CPU efficiency (tokens per CPU second, ours / encode_batch_fast): "
            f"{cpu['encode_batch_fast'] / cpu['ours']:.2f}"
        )

        memory = {name: ours(name, monitor=True) for name in ("small", "large")}
        print(f"\npeak memory of prepare ({args.workers} workers), MB (VmHWM; the tree: sampled sum of VmRSS):")
        print(f"{'corpus':>10}{'tokens':>14}{'prepare process':>17}{'largest worker':>16}{'whole tree':>12}")
        for name in ("small", "large"):
            m = memory[name]
            print(
                f"{sizes[name]:8g}MB{m['tokens']:14,}{m['rss_self_mb']:17.1f}{m['rss_worker_mb']:16.1f}"
                f"{m['rss_tree_mb']:12.1f}  ({m['processes']} processes)"
            )
        keys = ("rss_self_mb", "rss_worker_mb", "rss_tree_mb")
        ratios = {key: memory["large"][key] / memory["small"][key] for key in keys}
        print(
            f"ratio {args.memory_scale:g}x corpus / 1x: prepare process {ratios['rss_self_mb']:.3f}, "
            f"largest worker {ratios['rss_worker_mb']:.3f}, whole tree {ratios['rss_tree_mb']:.3f}"
        )

        print(
            result_line(
                f"prepare_{mb:g}mb_{args.workers}workers_vs_1thread", tps["ours"], tps["encode_batch"], "tok/s", "cpu"
            )
        )
        print(
            result_line(
                f"prepare_peak_rss_{sizes['large']:g}mb_vs_{sizes['small']:g}mb",
                memory["large"]["rss_tree_mb"],
                memory["small"]["rss_tree_mb"],
                "MB",
                "cpu",
            )
        )


if __name__ == "__main__":
    main()
