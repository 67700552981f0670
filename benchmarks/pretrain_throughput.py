"""Whole-loop pretraining throughput: gptlab's ``Trainer`` against the bare train step it wraps.

What is compared, and why:

- ours: real pretraining. ``Trainer.fit`` over a ``TokenLoader`` reading shards that this
  script prepares from a generated corpus (``gptlab.pretrain``'s ``DeviceBatches`` and
  ``next_token_loss``), with everything the loop does each step: data loading, the learning-rate
  schedule, gradient clipping, AdamW, the NaN/inf guard, ``metrics.jsonl`` every ``log_every``
  steps, the progress bar. Evaluation is off and one checkpoint is written, at the end.
- peer: the same model shape, batch size and sequence length, forward + backward + AdamW in a
  plain Python loop over one batch made beforehand on the device.

``1 - ours / peer`` is what the loop costs on top of the arithmetic; the target is under 5%.

Both run in one process and alternate: fit() runs once, and its batch source (``Interleaver``
below) hands over to the bare loop every ``--steps`` optimizer steps, so the timed repeats go
bare, loop, bare, loop, ... with no checkpoint or restart in between. A loop repeat is the time
between two hand-overs: ``--steps`` whole iterations of fit(), data loading included. Medians;
the median of the paired ratios (each loop repeat against the mean of the bare repeats just
before and after it, under the same load) is printed too: it resists a shared machine's drift
better.
The one-off costs of a run (fit's start-up, the final checkpoint) are printed separately, and
so is the cost of each per-step extra measured alone, which is steadier than the difference of
two noisy medians on a shared machine.

    python benchmarks/pretrain_throughput.py                          # the cpu shape: ~45 s on 2 idle cores
    python benchmarks/pretrain_throughput.py --shape tiny --steps 5 --repeats 21
    python benchmarks/pretrain_throughput.py --shape llama-124m --device cuda --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import device_name, result_line, synchronize
from benchmarks.prepare_throughput import train_tokenizer, write_corpus
from gptlab.data import TokenLoader, prepare
from gptlab.model import GPT, ModelConfig
from gptlab.pretrain import DeviceBatches, next_token_loss
from gptlab.train.loop import TrainConfig, Trainer, learning_rate, peak_memory_mb, setup_runtime

SHAPES = {
    # (n_embd, n_layer, n_head, vocab, seq_len, batch)
    "tiny": (128, 4, 4, 2048, 128, 16),  # TinyWorld's scale: a short step, so the loop's share is largest
    "cpu": (256, 4, 4, 4096, 256, 8),  # about 2.5 s a step on 2 cores
    "llama-124m": (768, 12, 12, 50304, 1024, 16),  # GPT-2 small's widths in the llama family (untied: 162M), for a GPU
}
MAX_TOKENIZER_VOCAB = 4096  # a larger model vocabulary is fine: ids stay below the tokenizer's


class Interleaver:
    """A batch source that passes batches through and, every ``steps`` optimizer steps after
    ``warmup``, closes the running loop repeat, runs one timed bare repeat, and opens the next
    loop repeat. The bare repeats bracket the loop repeats: bare, loop, bare, ..., loop, bare."""

    def __init__(self, inner: DeviceBatches, steps: int, warmup: int, bare_repeat, device: str):
        self.inner, self.steps, self.warmup = inner, steps, warmup
        self.bare_repeat, self.device = bare_repeat, device
        self.calls = 0
        self.first_call: float | None = None  # when fit() asked for its first batch
        self.mark: float | None = None  # start of the running loop repeat
        self.loop_times: list[float] = []
        self.bare_times: list[float] = []

    def next_batch(self):
        if self.first_call is None:
            self.first_call = time.perf_counter()
        if self.calls >= self.warmup and (self.calls - self.warmup) % self.steps == 0:
            synchronize(self.device)
            if self.mark is not None:
                self.loop_times.append(time.perf_counter() - self.mark)
            self.bare_times.append(self.bare_repeat())
            synchronize(self.device)
            self.mark = time.perf_counter()
        self.calls += 1
        return self.inner.next_batch()

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def median_ms(fn, calls: int, device: str) -> float:
    times = []
    for _ in range(calls):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed repeat (default 2)")
    parser.add_argument("--repeats", type=int, default=15, help="timed loop repeats (default 15; one more bare)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each side first (default 2)")
    parser.add_argument("--log-every", type=int, default=TrainConfig.log_every, help="the loop's train.log_every")
    parser.add_argument("--corpus-mb", type=float, default=2.0, help="generated corpus size (default 2 MB)")
    args = parser.parse_args()

    n_embd, n_layer, n_head, vocab, seq_len, batch = SHAPES[args.shape]
    total_steps = args.warmup + args.repeats * args.steps + 1  # the last step closes the last repeat
    cfg = TrainConfig(
        max_steps=total_steps,
        batch_size=batch,
        seq_len=seq_len,
        lr=3e-4,
        warmup_steps=10,
        eval_every=0,
        save_every=0,
        log_every=args.log_every,
        device=args.device,
    )
    runtime = setup_runtime(cfg)
    device = str(runtime.device)
    model_cfg = ModelConfig(
        family="llama", vocab_size=vocab, block_size=seq_len, n_layer=n_layer, n_head=n_head, n_embd=n_embd
    )

    with tempfile.TemporaryDirectory(prefix="gptlab-pretrain-bench-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        write_corpus(tmp / "corpus" / "corpus.txt", args.corpus_mb)
        train_tokenizer(tmp / "corpus" / "corpus.txt", tmp / "tok", min(vocab, MAX_TOKENIZER_VOCAB))
        meta = prepare(tmp / "tok", [tmp / "corpus"], tmp / "shards", workers=1)
        print(
            f"corpus {args.corpus_mb:g} MB -> {meta['splits']['train']['tokens']:,} training tokens "
            f"({time.perf_counter() - start:.1f} s)"
        )

        torch.manual_seed(0)
        model = GPT(model_cfg)
        torch.manual_seed(0)
        bare = GPT(model_cfg).to(runtime.device).train()
        bare_optimizer = torch.optim.AdamW(
            bare.parameters(),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            weight_decay=cfg.weight_decay,
            fused=runtime.device.type == "cuda",
        )
        x = torch.randint(0, vocab, (batch, seq_len), device=runtime.device)
        y = torch.randint(0, vocab, (batch, seq_len), device=runtime.device)

        def bare_step():
            with runtime.autocast():
                loss = bare(x, y)
            loss.backward()
            bare_optimizer.step()
            bare_optimizer.zero_grad(set_to_none=True)

        def bare_repeat() -> float:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                bare_step()
            synchronize(device)
            return time.perf_counter() - start

        loader = TokenLoader(tmp / "shards", seq_len=seq_len, batch_size=batch, seed=cfg.seed)
        batches = Interleaver(DeviceBatches(loader, runtime.device), args.steps, args.warmup, bare_repeat, device)
        trainer = Trainer(model, cfg, runtime, tmp / "run", next_token_loss, batches)
        save_seconds = []
        save = trainer.save_checkpoint

        def timed_save():
            start = time.perf_counter()
            save()
            save_seconds.append(time.perf_counter() - start)

        trainer.save_checkpoint = timed_save

        for _ in range(args.warmup):
            bare_step()
        fit_start = time.perf_counter()
        trainer.fit()
        fit_seconds = time.perf_counter() - fit_start
        assert len(batches.loop_times) + 1 == len(batches.bare_times) == args.repeats + 1, "repeats out of step"

        # The loop's per-step extras, each alone: steadier than the difference of two medians.
        data = DeviceBatches(TokenLoader(tmp / "shards", seq_len=seq_len, batch_size=batch, seed=1), runtime.device)
        with runtime.autocast():
            next_token_loss(trainer.model, data.next_batch()).backward()
        params = list(trainer.model.parameters())
        extras = {
            "data loading (TokenLoader + to device)": median_ms(data.next_batch, 50, device),
            "lr schedule": median_ms(lambda: set_lr(trainer.optimizer, learning_rate(cfg, 7)), 50, device),
            "gradient clipping": median_ms(lambda: torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip), 20, device),
            "NaN/inf guard": median_ms(
                lambda: bool(torch.isfinite(torch.zeros((), device=runtime.device))), 50, device
            ),
            f"metrics record / log_every={cfg.log_every}": median_ms(
                lambda: trainer._log({"step": 0, "peak_mem_mb": peak_memory_mb(runtime.device)}), 20, device
            )
            / cfg.log_every,
        }
        trainer.model.zero_grad(set_to_none=True)

    tokens = batch * seq_len * args.steps
    loop_s, bare_s = statistics.median(batches.loop_times), statistics.median(batches.bare_times)
    loop_tps, bare_tps = tokens / loop_s, tokens / bare_s
    overhead = 1 - loop_tps / bare_tps
    step_ms = 1000 * bare_s / args.steps
    print(
        f"shape {args.shape}: {model.num_params():,} params, batch {batch} x {seq_len}, "
        f"{'bf16 autocast' if runtime.autocast_dtype else 'fp32'}, {device_name(device)}"
    )
    print(f"{args.repeats} interleaved repeats of {args.steps} steps, medians:")
    print(f"{'':34}{'s/step':>9}{'tok/s':>11}")
    print(f"{'Trainer.fit (whole loop)':34}{loop_s / args.steps:9.3f}{loop_tps:11,.0f}")
    print(f"{'bare forward+backward+AdamW':34}{bare_s / args.steps:9.3f}{bare_tps:11,.0f}")
    bare_around = [(a + b) / 2 for a, b in zip(batches.bare_times, batches.bare_times[1:])]
    paired = statistics.median(bare / loop for loop, bare in zip(batches.loop_times, bare_around))
    print(
        f"overhead 1 - loop/bare: {100 * overhead:+.1f}% (target < 5%); paired: {100 * (1 - paired):+.1f}% "
        f"(median over loop repeats of 1 - loop / mean of the bare repeats before and after it)"
    )
    loop_list, bare_list = (
        " ".join(f"{t / args.steps:.3f}" for t in times) for times in (batches.loop_times, batches.bare_times)
    )
    print(f"  per-repeat s/step, loop: {loop_list}; bare: {bare_list}")
    swing = max(batches.bare_times) / min(batches.bare_times)
    if swing > 1.3:
        print(
            f"  warning: the bare repeats vary {swing:.1f}x, so other work shared the cores; the medians can be "
            f"far off, the paired figure less so: rerun on an idle machine"
        )
    print(f"per-step extras of the loop, each timed alone (median ms; % of a bare step of {step_ms:.0f} ms):")
    for name, ms in extras.items():
        print(f"  {name:44}{ms:9.3f} ms{100 * ms / step_ms:8.2f}%")
    total_extra = sum(extras.values())
    print(f"  {'sum':44}{total_extra:9.3f} ms{100 * total_extra / step_ms:8.2f}%")
    print(
        f"one-off costs of the run: start-up before the first batch {batches.first_call - fit_start:.2f} s "
        f"(on a CPU it includes the matmul-peak measurement for MFU), final checkpoint {sum(save_seconds):.2f} s; "
        f"fit() took {fit_seconds:.1f} s for {total_steps} steps"
    )
    print(result_line(f"pretrain_loop_vs_bare_step_{args.shape}", loop_tps, bare_tps, "tok/s", device))


if __name__ == "__main__":
    main()
