"""The default ladder's tiny models on a CPU: gptlab's training loop against a nanoGPT-style plain loop.

What is compared, on the default ladder's shapes (``--shapes d3 d5``: depth, width depth x 24 rounded
up to 16, one token per character, 16 windows of 512 tokens a step, the ladder's AdamW settings):

- gptlab: ``Trainer.fit`` as ``gptlab pretrain`` runs it (``gptlab.pretrain``'s ``DeviceBatches``,
  ``next_token_loss`` and validation), over a ``TokenLoader`` reading shards of a small TinyWorld
  that this script writes: the learning-rate schedule, gradient clipping, the NaN guard, MFU
  accounting, ``metrics.jsonl`` every ``train.log_every`` steps, the progress bar. Periodic
  evaluation is off; the final step's evaluation and checkpoint come after the last timed repeat.
- plain: nanoGPT's ``train.py`` loop, no logging: random windows of the same training shard
  (``get_batch`` on a memmap), the learning rate set each step, forward (under autocast where asked),
  backward, ``clip_grad_norm_``, AdamW with decay on matrices only, ``zero_grad(set_to_none=True)``.
  The same GPT class and config, the same batch x seq_len, its own copy of the weights.

Both run in one process and alternate (``benchmarks/pretrain_throughput.py``'s ``Interleaver``:
plain, gptlab, plain, ..., gptlab, plain; each repeat ``--steps`` optimizer steps); medians, and
the median of paired ratios (each gptlab repeat against the plain repeats around it). For each
shape, dtype (fp32; bf16 autocast, ``torch.autocast("cpu", dtype=torch.bfloat16)``), compile
setting and thread count, three JSON lines: gptlab's, the plain loop's, then the comparison.

    python benchmarks/tiny_loop.py                                   # d3, d5; fp32, bf16; eager; 1 and 2 threads
    python benchmarks/tiny_loop.py --shapes d3 --compile both --threads 2
    python benchmarks/tiny_loop.py --settings --compile both         # the plain loop's settings side by side
    python benchmarks/tiny_loop.py --settings --dtypes fp32 --threads 1 --batches 8 16 32
    python benchmarks/tiny_loop.py --profile d5                      # one step of each loop, by operator
    python benchmarks/tiny_loop.py --curve 148                       # d3's val loss, fp32 vs bf16, 148 steps
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import comparison, emit, interleaved_medians, mfu
from benchmarks.pretrain_throughput import Interleaver
from gptlab import scaling
from gptlab.config import to_dict
from gptlab.data import TokenLoader, iter_documents, prepare, read_meta
from gptlab.data.shards import open_shard
from gptlab.ladder import DataConfig, LadderTrainConfig, SizesConfig
from gptlab.model import GPT, ModelConfig
from gptlab.pretrain import DeviceBatches, PretrainConfig, next_token_loss, validation
from gptlab.tokenizer import Tokenizer
from gptlab.train.loop import Trainer, learning_rate, setup_runtime
from gptlab.world import write_world

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def make_shards(folder: Path, vocab_size: int) -> Path:
    """Shards of a quick TinyWorld's corpus with the ladder's one-token-per-character tokenizer."""
    write_world(folder / "world", seed=0, preset="quick")
    tokenizer = Tokenizer.train(iter_documents(folder / "world" / "corpus"), vocab_size=vocab_size)
    tokenizer.save_pretrained(folder / "tokenizer")
    prepare(folder / "tokenizer", folder / "world" / "corpus", folder / "shards", val_fraction=0.05, workers=1)
    return folder / "shards"


def ladder_model(depth: int, vocab_size: int) -> ModelConfig:
    sizes = SizesConfig()
    return scaling.ladder_config(
        depth,
        vocab_size=vocab_size,
        block_size=sizes.block_size,
        aspect=sizes.aspect,
        head_dim=sizes.head_dim,
        family=sizes.family,
    )


def train_config(steps: int, dtype: str, compile_: bool, **overrides) -> LadderTrainConfig:
    """The ladder's training settings on the CPU, periodic evaluation off, one checkpoint at the end."""
    fields = dict(
        max_steps=steps,
        warmup_steps=min(LadderTrainConfig.warmup_steps, steps // 5),  # the ladder's rule
        eval_every=0,
        save_every=0,
        device="cpu",
        dtype=dtype,
        compile=compile_,
        seed=0,
    )
    return LadderTrainConfig(**{**fields, **overrides})


class PlainLoop:
    """nanoGPT's training loop on ``model_cfg`` with ``cfg``'s batch, window and AdamW settings."""

    def __init__(self, model_cfg: ModelConfig, cfg: LadderTrainConfig, shards: Path):
        torch.manual_seed(0)
        self.model = GPT(model_cfg).train()
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.data = open_shard(shards / read_meta(shards)["splits"]["train"]["shards"][0])
        self.cfg, self.iter = cfg, 0
        self.autocast_dtype = DTYPES[cfg.dtype]

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = self.cfg.seq_len
        starts = torch.randint(len(self.data) - seq_len - 1, (self.cfg.batch_size,))
        x = torch.stack([torch.from_numpy(self.data[i : i + seq_len].astype(np.int64)) for i in starts])
        y = torch.stack([torch.from_numpy(self.data[i + 1 : i + 1 + seq_len].astype(np.int64)) for i in starts])
        return x, y

    def step(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.cfg, self.iter)
        x, y = self.get_batch()
        with torch.autocast("cpu", dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext():
            loss = self.forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter += 1


def gptlab_trainer(model_cfg: ModelConfig, cfg: LadderTrainConfig, shards: Path, out: Path, batches=None) -> Trainer:
    """A Trainer wired as ``gptlab.pretrain.pretrain`` wires it; ``batches`` wraps its batch source."""
    runtime = setup_runtime(cfg)
    pretrain_cfg = PretrainConfig(model=model_cfg, train=cfg)
    pretrain_cfg.data.shards = str(shards)
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    loader = DeviceBatches(
        TokenLoader(shards, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed), runtime.device
    )
    return Trainer(
        model,
        cfg,
        runtime,
        out,
        next_token_loss,
        batches(loader) if batches else loader,
        evaluate=validation(pretrain_cfg, runtime),
        tokenizer=Tokenizer.from_pretrained(shards / "tokenizer"),
    )


def compare(args, shards: Path, tmp: Path, shape: str, dtype: str, compile_: bool, threads: int) -> None:
    """One alternating comparison; prints gptlab's line, the plain loop's, then the ratio."""
    torch.set_num_threads(threads)
    model_cfg = ladder_model(int(shape[1:]), read_meta(shards)["vocab_size"])
    warmup = args.warmup + (2 if compile_ else 0)  # compilation: the first forward and backward
    cfg = train_config(warmup + args.repeats * args.steps + 1, dtype, compile_)
    plain = PlainLoop(model_cfg, cfg, shards)

    def plain_repeat() -> float:
        start = time.perf_counter()
        for _ in range(args.steps):
            plain.step()
        return time.perf_counter() - start

    for _ in range(warmup):
        plain.step()
    out = tmp / f"run-{shape}-{dtype}-{compile_}-{threads}"
    trainer = gptlab_trainer(
        model_cfg, cfg, shards, out, lambda inner: Interleaver(inner, args.steps, warmup, plain_repeat, "cpu")
    )
    trainer.fit()
    timed = trainer.batches
    tokens = args.steps * cfg.batch_size * cfg.seq_len
    flops = trainer.model.flops_per_token(cfg.seq_len)
    around = [(a + b) / 2 for a, b in zip(timed.bare_times, timed.bare_times[1:])]
    paired = statistics.median(plain_s / ours_s for ours_s, plain_s in zip(timed.loop_times, around))
    rates = {}
    common = dict(shape=shape, params=trainer.model.num_params(), batch=cfg.batch_size, seq_len=cfg.seq_len)
    common.update(dtype=dtype, compile=compile_, threads=threads)
    for name, times in (("gptlab", timed.loop_times), ("plain", timed.bare_times)):
        rates[name] = tokens / statistics.median(times)
        emit(
            {
                "benchmark": f"tiny_loop_{shape}",
                "contender": name,
                "tok_per_s": round(rates[name], 1),
                "mfu": mfu(rates[name] * flops, "cpu"),
                "step_ms": round(1000 * statistics.median(times) / args.steps, 1),
                "spread": round(max(times) / min(times), 2),
                **common,
                "device": f"cpu ({threads} threads)",
            }
        )
    emit(
        comparison(
            f"tiny_loop_{shape}",
            rates["gptlab"],
            rates["plain"],
            "tok/s",
            "cpu",
            paired_ratio=round(paired, 3),
            load=round(os.getloadavg()[0], 2),  # other work on the cores moves the figures
            **common,
        )
    )


def variants(args, shards: Path, shape: str, compiles: list[bool]) -> None:
    """The plain loop of one shape in every dtype, compile setting, thread count and batch size asked,
    their repeats alternated in one process: each one's tokens/s and its speed-up over the first (fp32,
    eager, the fewest threads, the smallest batch), as JSON lines."""
    model_cfg = ladder_model(int(shape[1:]), read_meta(shards)["vocab_size"])
    settings = [
        (d, c, t, b) for c in compiles for d in args.dtypes for t in sorted(args.threads) for b in sorted(args.batches)
    ]
    loops, warmup_s = {}, {}
    for dtype, compile_, threads, batch in settings:
        torch.set_num_threads(threads)
        loop = PlainLoop(model_cfg, train_config(10**6, dtype, compile_, batch_size=batch), shards)
        start = time.perf_counter()
        for _ in range(args.warmup + (2 if compile_ else 0)):
            loop.step()
        loops[dtype, compile_, threads, batch] = loop
        warmup_s[dtype, compile_, threads, batch] = time.perf_counter() - start  # compilation included

    def repeat(setting):
        def run():
            torch.set_num_threads(setting[2])
            for _ in range(args.steps):
                loops[setting].step()

        return run

    seconds, _ = interleaved_medians({s: repeat(s) for s in settings}, args.repeats, "cpu")
    rates = {s: args.steps * s[3] * loops[s].cfg.seq_len / median for s, median in seconds.items()}
    for (dtype, compile_, threads, batch), rate in rates.items():
        emit(
            {
                "benchmark": f"tiny_loop_settings_{shape}",
                "dtype": dtype,
                "compile": compile_,
                "threads": threads,
                "batch": batch,
                "tok_per_s": round(rate, 1),
                "speedup": round(rate / rates[settings[0]], 3),
                "warmup_steps": args.warmup + (2 if compile_ else 0),
                "warmup_s": round(warmup_s[dtype, compile_, threads, batch], 1),
                "load": round(os.getloadavg()[0], 2),
            }
        )


def profile(shape: str, shards: Path, tmp: Path, steps: int, rows: int) -> None:
    """``steps`` steps of each loop under torch.profiler, by operator: where gptlab's step spends more."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model_cfg = ladder_model(int(shape[1:]), read_meta(shards)["vocab_size"])
    cfg = train_config(2 * steps + 2, "fp32", False)
    plain = PlainLoop(model_cfg, cfg, shards)
    plain.step()
    tables = {}

    class Profiled:
        """Profiles the Trainer's steps 2 .. steps + 1 (from the batch that starts them to the next)."""

        def __init__(self, inner):
            self.inner, self.calls, self.prof = inner, 0, None

        def next_batch(self):
            if self.calls == 1:
                self.prof = torch_profile(activities=[ProfilerActivity.CPU])
                self.prof.__enter__()
            if self.calls == steps + 1:
                self.prof.__exit__(None, None, None)
                tables["gptlab"] = self.prof.key_averages()
            self.calls += 1
            return self.inner.next_batch()

        def state_dict(self):
            return self.inner.state_dict()

        def load_state_dict(self, state):
            self.inner.load_state_dict(state)

    gptlab_trainer(model_cfg, cfg, shards, tmp / f"profile-{shape}", Profiled).fit()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            plain.step()
    tables["plain"] = prof.key_averages()
    self_ms = {name: {e.key: e.self_cpu_time_total / 1000 / steps for e in t} for name, t in tables.items()}
    keys = sorted(set(self_ms["gptlab"]) | set(self_ms["plain"]), key=lambda k: -self_ms["gptlab"].get(k, 0.0))
    print(f"{shape}, fp32, {torch.get_num_threads()} threads: self CPU ms per step, mean of {steps} steps")
    print(f"{'operator':48}{'gptlab':>10}{'plain':>10}{'diff':>10}")
    for key in keys[:rows]:
        ours, peer = self_ms["gptlab"].get(key, 0.0), self_ms["plain"].get(key, 0.0)
        print(f"{key[:47]:48}{ours:10.2f}{peer:10.2f}{ours - peer:+10.2f}")
    totals = {name: sum(ms.values()) for name, ms in self_ms.items()}
    print(f"{'total':48}{totals['gptlab']:10.2f}{totals['plain']:10.2f}{totals['gptlab'] - totals['plain']:+10.2f}")
    only_ours = sorted(((ms, k) for k, ms in self_ms["gptlab"].items() if k not in self_ms["plain"]), reverse=True)
    print("operators only gptlab's step runs: " + ", ".join(f"{k} {ms:.2f} ms" for ms, k in only_ours[:8]))


def curve(steps: int, shards: Path, tmp: Path, every: int) -> None:
    """d3 trained by the Trainer for ``steps`` steps with the ladder's schedule, fp32 then bf16 autocast:
    the val loss at every ``every`` steps and the wall time of each, as JSON lines."""
    model_cfg = ladder_model(3, read_meta(shards)["vocab_size"])
    for dtype in DTYPES:
        cfg = train_config(steps, dtype, False, eval_every=every, log_every=every)
        trainer = gptlab_trainer(model_cfg, cfg, shards, tmp / f"curve-{dtype}")
        start = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - start
        records = [r for r in trainer.run_folder.read_metrics() if "val_loss" in r]
        emit(
            {
                "benchmark": "tiny_loop_curve_d3",
                "dtype": dtype,
                "steps": steps,
                "val_loss": {r["step"]: r["val_loss"] for r in records},
                "train_loss": {r["step"]: r["loss"] for r in records},
                "seconds": round(seconds, 1),
                "threads": torch.get_num_threads(),
                "train": {
                    k: v for k, v in to_dict(cfg).items() if k in ("batch_size", "seq_len", "lr", "warmup_steps")
                },
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=("d1", "d2", "d3", "d4", "d5"), default=["d3", "d5"])
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--compile", choices=("off", "on", "both"), default="off")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed repeat (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of each loop (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each loop first (default 2)")
    parser.add_argument("--batches", nargs="+", type=int, default=[16], help="--settings' batch sizes (default 16)")
    parser.add_argument("--settings", action="store_true", help="the plain loop's settings against each other instead")
    parser.add_argument("--profile", choices=("d1", "d2", "d3", "d4", "d5"), help="profile one shape instead")
    parser.add_argument("--curve", type=int, metavar="STEPS", help="d3's val loss fp32 vs bf16 instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gptlab-tiny-loop-") as tmp:
        tmp = Path(tmp)
        # A fresh inductor cache, so that the first compiled setting's warm-up is what a new machine pays.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp / "inductor"))
        start = time.perf_counter()
        shards = make_shards(tmp, DataConfig().vocab_size)
        print(
            f"quick TinyWorld shards: {read_meta(shards)['splits']['train']['tokens']:,} training tokens "
            f"({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
        if args.profile:
            profile(args.profile, shards, tmp, steps=3, rows=25)
            return
        if args.curve:
            curve(args.curve, shards, tmp, every=max(1, args.curve // 3))
            return
        compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
        if args.settings:
            for shape in args.shapes:
                variants(args, shards, shape, compiles)
            return
        for shape in args.shapes:
            for threads in args.threads:
                for compile_ in compiles:
                    for dtype in args.dtypes:
                        compare(args, shards, tmp, shape, dtype, compile_, threads)


if __name__ == "__main__":
    main()
