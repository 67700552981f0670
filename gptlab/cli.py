"""The ``gptlab`` command. Each subcommand parses its flags and calls one library function;
user mistakes (``UserError``) end with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gptlab.errors import UserError


def cmd_world(args) -> None:
    from gptlab.world import format_summary, write_world

    summary = write_world(args.out, seed=args.seed, preset=args.preset, force=args.force)
    print(format_summary(summary))


def cmd_tokenizer(args) -> None:
    from gptlab.data import iter_documents
    from gptlab.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(iter_documents(args.input), vocab_size=args.vocab_size)
    tokenizer.save_pretrained(args.out)
    print(f"trained a {tokenizer.vocab_size}-token byte-level BPE tokenizer -> {args.out}")


def cmd_prepare(args) -> None:
    from gptlab.data import prepare

    meta = prepare(
        args.tokenizer, args.input, args.out, val_fraction=args.val_fraction, workers=args.workers, overwrite=args.overwrite
    )
    for split, info in meta["splits"].items():
        print(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens")
    print(f"shards -> {args.out}")


def cmd_pretrain(args) -> None:
    from gptlab.pretrain import load_config, pretrain

    out = Path(args.out)
    cfg = load_config(args.config, args.set, out, args.resume)
    pretrain(cfg, out, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":
        print(f"model -> {out / 'model'}")


def cmd_sample(args) -> None:
    from gptlab.engine import Engine
    from gptlab.model import GPT
    from gptlab.tokenizer import Tokenizer

    model_dir = Path(args.model)
    model = GPT.from_pretrained(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise UserError(
            f"{model_dir} has no tokenizer.json, so the prompt cannot be encoded; "
            "copy the tokenizer files into the model folder (gptlab pretrain saves them there)"
        )
    engine = Engine(model.eval(), Tokenizer.from_pretrained(model_dir))
    for piece in engine.stream_text(
        args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    ):
        print(piece, end="", flush=True)
    print()


def cmd_demo(args) -> None:
    from gptlab.demo import run_demo

    run_demo(Path(args.out), preset=args.preset, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptlab", description="Train, evaluate, align and rank GPT-style models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("world", help="write TinyWorld: corpus, benchmarks, SFT and preference data, oracle")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="default", help="quick | default | large")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder that is not a world")
    p.set_defaults(func=cmd_world)

    p = commands.add_parser("tokenizer", help="train a byte-level BPE tokenizer on text files")
    p.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl/.parquet files or folders")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--out", required=True, help="folder for tokenizer.json and tokenizer_config.json")
    p.set_defaults(func=cmd_tokenizer)

    p = commands.add_parser("prepare", help="tokenize a corpus into binary token shards")
    p.add_argument("--tokenizer", required=True, help="a tokenizer folder")
    p.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl/.parquet files or folders")
    p.add_argument("--out", required=True, help="folder for the shards and meta.json")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.set_defaults(func=cmd_prepare)

    p = commands.add_parser("pretrain", help="pretrain with next-token prediction (torchrun for several processes)")
    p.add_argument("--config", help="a TOML file; every key has a default")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--out", required=True, help="run folder: run.json, metrics.jsonl, checkpoints/, model/")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.set_defaults(func=cmd_pretrain)

    p = commands.add_parser("sample", help="continue a prompt with a model")
    p.add_argument("--model", required=True, help="a model folder (gptlab or Hugging Face Llama/GPT-2)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_sample)

    p = commands.add_parser("demo", help="the whole pipeline on TinyWorld -> OUT/report.md")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--preset", default="quick", help="quick (<= 5 min on a 2-core CPU) | default (<= 30 min)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"gptlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
