"""The training loop's own MFU: gptlab's Trainer (``train.compile=true`` by default) for a few dozen
steps of next-token prediction on random tokens, reading the MFU it logs to ``metrics.jsonl``.

What a user's pretraining run reaches, loop included (the fused AdamW, the queued update, the log
windows), rather than a bare step's. Each logged window is printed as a JSON line as soon as the
loop writes it; the last line gives the median of the windows after the first (which holds the
compilation), with torch.compile's graph breaks and recompiles.

    python benchmarks/trainer_mfu.py --device cuda --shape gpt2-124m --steps 30 --out runs/trainer_mfu
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import SHAPES, CompileWatch, device_name, emit, model_config
from gptlab.data.loader import to_device
from gptlab.model import GPT
from gptlab.train.loop import TrainConfig, Trainer, setup_runtime


class RandomTokens:
    """Batches of random tokens, moved to the device as pretraining's are (nothing to resume): the loop's
    cost, not the data's."""

    def __init__(self, vocab: int, batch: int, seq_len: int, device: torch.device):
        self.generator = torch.Generator().manual_seed(0)
        self.vocab, self.shape, self.device = vocab, (batch, seq_len + 1), device

    def next_batch(self):
        window = to_device(torch.randint(0, self.vocab, self.shape, generator=self.generator), self.device)
        return window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shape", default="gpt2-124m", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--batch", type=int, help="sequences per step (default: the shape's)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", help="the run folder (default: a temporary one)")
    args = parser.parse_args()
    *_, seq_len, batch = SHAPES[args.shape]
    cfg = TrainConfig(
        max_steps=args.steps,
        batch_size=args.batch or batch,
        seq_len=seq_len,
        warmup_steps=0,
        eval_every=0,
        log_every=args.log_every,
        save_every=0,
        device=args.device,
        compile=args.compile,
    )
    runtime = setup_runtime(cfg)
    torch.manual_seed(0)
    model = GPT(model_config(args.shape))
    batches = RandomTokens(model.config.vocab_size, cfg.batch_size, seq_len, runtime.device)
    device = str(runtime.device)
    benchmark = f"trainer_{'compiled' if args.compile else 'eager'}_{args.shape}"
    with contextlib.ExitStack() as stack:
        out = args.out or stack.enter_context(tempfile.TemporaryDirectory())
        trainer = Trainer(model, cfg, runtime, out, lambda m, b: m(*b), batches)
        log = trainer._log

        def log_and_emit(record: dict) -> None:  # each window as the loop logs it: a cut-off run keeps them
            log(record)
            emit({"benchmark": benchmark, **record, "device": device_name(device)})

        trainer._log = log_and_emit
        watch = stack.enter_context(CompileWatch() if args.compile else contextlib.nullcontext())
        trainer.fit()
        windows = [r for r in trainer.run_folder.read_metrics() if "mfu" in r][1:]
    emit(
        {
            "benchmark": benchmark,
            "summary": "median of the logged windows after the first",
            "mfu": statistics.median(r["mfu"] for r in windows) if windows and windows[0]["mfu"] else None,
            "tok_per_s": statistics.median(r["tok_per_s"] for r in windows) if windows else None,
            "steps": args.steps,
            "batch": cfg.batch_size,
            "seq_len": seq_len,
            "dtype": "bf16" if runtime.autocast_dtype == torch.bfloat16 else "fp32",
            **(watch.summary() if watch else {}),
            "device": device_name(device),
        }
    )


if __name__ == "__main__":
    main()
