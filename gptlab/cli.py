"""The ``gptlab`` command. Each subcommand parses its flags and calls one library function;
user mistakes (``UserError``) end with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from gptlab.errors import UserError
from gptlab.fileio import check_text

SAMPLE_MAX_NEW_TOKENS = 64  # `gptlab sample`'s default continuation, when the model's block size allows


def cmd_world(args) -> None:
    from gptlab.world import format_summary, write_world

    summary = write_world(args.out, seed=args.seed, preset=args.preset, force=args.force)
    print(format_summary(summary))


def cmd_tokenizer(args) -> None:
    from gptlab.data import iter_documents, require_documents
    from gptlab.tokenizer import Tokenizer

    texts = require_documents(iter_documents(args.input), ", ".join(map(str, args.input)))
    tokenizer = Tokenizer.train(texts, vocab_size=args.vocab_size)
    tokenizer.save_pretrained(args.out)
    print(f"trained a {tokenizer.vocab_size}-token byte-level BPE tokenizer -> {args.out}")


def cmd_prepare(args) -> None:
    from gptlab.data import prepare

    meta = prepare(
        args.tokenizer,
        args.input,
        args.out,
        val_fraction=args.val_fraction,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    for split, info in meta["splits"].items():
        print(f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens")
    print(f"shards -> {args.out}")


def train_stage(args, load_config, train) -> None:
    """A training command: resolve the config, train (resuming when asked), name the model folder."""
    out = Path(args.out)
    cfg = load_config(args.config, args.set, out, args.resume)
    train(cfg, out, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":
        print(f"model -> {out / 'model'}")


def cmd_pretrain(args) -> None:
    from gptlab.pretrain import load_config, pretrain

    train_stage(args, load_config, pretrain)


def cmd_sample(args) -> None:
    from gptlab.engine import Engine

    check_text(args.prompt, "--prompt")
    for stop in args.stop:
        check_text(stop, "--stop")
    engine = Engine.from_pretrained(args.model)
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:  # what the model's window leaves after the prompt, at most 64
        prompt_tokens, block_size = len(engine.tokenizer.encode(args.prompt)), engine.model.config.block_size
        if prompt_tokens >= block_size:
            raise UserError(
                f"--prompt is {prompt_tokens} tokens, which fills the model's block_size {block_size}: shorten it"
            )
        max_new_tokens = min(SAMPLE_MAX_NEW_TOKENS, block_size - prompt_tokens)
    for piece in engine.stream_text(
        args.prompt,
        max_new_tokens=max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop,
    ):
        print(piece, end="", flush=True)
    print()


def cmd_sft(args) -> None:
    from gptlab.align.sft import load_config, sft

    train_stage(args, load_config, sft)


def cmd_reward(args) -> None:
    from gptlab.align.reward import load_config, reward

    train_stage(args, load_config, reward)


def cmd_dpo(args) -> None:
    from gptlab.align.dpo import dpo, load_config

    train_stage(args, load_config, dpo)


def cmd_grpo(args) -> None:
    from gptlab.align.grpo import grpo, load_config

    train_stage(args, load_config, grpo)


def cmd_ppo(args) -> None:
    from gptlab.align.ppo import load_config, ppo

    train_stage(args, load_config, ppo)


def cmd_chat(args) -> None:
    from gptlab.chat import ChatSession, piped_lines, run_chat, typed_lines
    from gptlab.engine import Engine

    if args.system is not None:
        check_text(args.system, "--system")
    engine = Engine.from_pretrained(args.model)

    def notify(message: str) -> None:
        print(f"gptlab: {message}", file=sys.stderr, flush=True)

    session = ChatSession(
        engine,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        notify=notify,
    )
    if sys.stdin.isatty():
        print(f"chatting with {args.model}; Ctrl-D to quit", file=sys.stderr)
        run_chat(session, typed_lines("> ", notify))
    else:  # scripted: one message per line, one reply per message
        run_chat(session, piped_lines(sys.stdin.buffer))


def cmd_ladder(args) -> None:
    from gptlab.ladder import load_config, run_ladder
    from gptlab.report import write_ladder_report

    out = Path(args.out)
    cfg = load_config(args.preset, args.config, args.set)
    run_ladder(cfg, out, preset=args.preset)
    print(f"ladder -> {out / 'ladder.json'}; report -> {write_ladder_report(out)}")


def cmd_eval(args) -> None:
    from gptlab.eval import evaluate, format_table, load_backend, warnings_as_lines, write_results, write_samples

    try:
        shots = [int(k) for k in args.shots.split(",")]
    except ValueError:
        raise UserError(f"--shots takes comma-separated integers (e.g. 0,1,5), got {args.shots!r}") from None
    for path in filter(None, (args.out, args.samples)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    backend = load_backend(args.backend, args.model, device=args.device, base_url=args.base_url)
    with warnings_as_lines():
        results = evaluate(
            backend,
            args.tasks.split(","),
            args.data,
            shots=shots,
            cot=args.cot,
            batch_size=args.batch_size,
            limit=args.limit,
            seed=args.seed,
            return_samples=args.samples is not None,
            chat=args.chat,
        )
    results["config"]["model"] = args.model
    if args.out:
        write_results(args.out, results)
    if args.samples:
        write_samples(args.samples, results["samples"])
    print(format_table(results))
    written = [f"{what} -> {path}" for what, path in (("results", args.out), ("samples", args.samples)) if path]
    if written:
        print("; ".join(written))


def cmd_report(args) -> None:
    from gptlab.report import write_reports

    for path in write_reports(Path(args.folder)):
        print(f"report -> {path}")


def cmd_serve(args) -> None:
    try:
        from gptlab.serve.server import serve
    except ImportError as e:
        if (e.name or "").split(".")[0] not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        raise UserError(f"gptlab serve needs {e.name}, which is not installed: pip install 'gptlab[serve]'") from None
    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        arena_specs=args.arena,
        arena_db=args.arena_db,
    )


def cmd_arena_run(args) -> None:
    from gptlab.arena.judges import load_judge
    from gptlab.arena.run import check_battles, format_summary, parse_models, read_prompts, run_arena
    from gptlab.fileio import read_text

    models, prompts = parse_models(args.models), read_prompts(args.prompts)
    check_battles(args.battles)
    template = None if args.judge_template is None else read_text(args.judge_template)
    judge = load_judge(args.judge, world=args.world, device=args.device, template=template, tie_band=args.tie_band)
    battles, total = run_arena(
        models,
        prompts,
        judge,
        args.battles,
        args.db,
        device=args.device,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        batch_size=args.batch_size,
    )
    print(format_summary(battles, args.db, total))


def cmd_arena_board(args) -> None:
    from gptlab.arena.board import Board, board_format, write_board
    from gptlab.arena.store import ArenaStore

    fmt = board_format(args.format, args.out)
    with ArenaStore(args.db, create=False) as store:
        battles = store.battles()
    text = write_board(Board(battles, rounds=args.bootstrap, seed=args.seed), fmt, args.out)
    print(text if text is not None else f"board -> {args.out}", end="" if text is not None else "\n")


def cmd_arena_import(args) -> None:
    from gptlab.arena.store import ArenaStore, read_fastchat

    battles = read_fastchat(args.fastchat)  # every row checked before the database is touched
    with ArenaStore(args.db) as store:
        added = store.add_many(battles)
        total = len(store)
    print(f"imported {added} new of {len(battles)} battles from {args.fastchat} -> {args.db} ({total} battles in all)")


def cmd_arena_export(args) -> None:
    from gptlab.arena.store import ArenaStore, write_fastchat

    with ArenaStore(args.db, create=False) as store:
        battles = store.battles()
    Path(args.fastchat).parent.mkdir(parents=True, exist_ok=True)
    written = write_fastchat(battles, args.fastchat)
    print(f"exported {written} battles from {args.db} -> {args.fastchat} (FastChat battle JSON)")


def cmd_demo(args) -> None:
    from gptlab.demo import run_demo_seeds

    # the demo runs its stages through main
    run_demo_seeds(Path(args.out), main, preset=args.preset, seed=args.seed, seeds=args.seeds)


def add_config_options(p: argparse.ArgumentParser, config_help: str = "a TOML file; every key has a default") -> None:
    p.add_argument("--config", help=config_help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")


def add_training_options(p: argparse.ArgumentParser) -> None:
    """The options of every command that trains through the one loop (pretrain, sft, reward, dpo, ppo, grpo)."""
    add_config_options(p)
    p.add_argument("--out", required=True, help="run folder: run.json, metrics.jsonl, checkpoints/, model/")
    fresh_or_not = p.add_mutually_exclusive_group()
    fresh_or_not.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint in --out"
    )
    fresh_or_not.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out that holds a run, deleting its checkpoints and model",
    )


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
    p.add_argument(
        "--input", nargs="+", required=True, help=".txt/.jsonl/.parquet files or folders, or hf:PATH[:CONFIG[:SPLIT]]"
    )
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--out", required=True, help="folder for tokenizer.json and tokenizer_config.json")
    p.set_defaults(func=cmd_tokenizer)

    p = commands.add_parser("prepare", help="tokenize a corpus into binary token shards")
    p.add_argument("--tokenizer", required=True, help="a tokenizer folder")
    p.add_argument(
        "--input", nargs="+", required=True, help=".txt/.jsonl/.parquet files or folders, or hf:PATH[:CONFIG[:SPLIT]]"
    )
    p.add_argument("--out", required=True, help="folder for the shards and meta.json")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.set_defaults(func=cmd_prepare)

    p = commands.add_parser("pretrain", help="pretrain with next-token prediction (torchrun for several processes)")
    add_training_options(p)
    p.set_defaults(func=cmd_pretrain)

    p = commands.add_parser("sample", help="continue a prompt with a model")
    p.add_argument("--model", required=True, help="a model folder (gptlab or Hugging Face Llama/GPT-2)")
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"most tokens to add (default: {SAMPLE_MAX_NEW_TOKENS}, or what the model's block size leaves after "
        "the prompt)",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="transformers' (CTRL's); 1 = none")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="end at this text, left out (repeatable; in bash, $'\\n' is a newline)",
    )
    p.set_defaults(func=cmd_sample)

    p = commands.add_parser("sft", help="supervised fine-tuning on chat data (torchrun for several processes)")
    add_training_options(p)
    p.set_defaults(func=cmd_sft)

    p = commands.add_parser("reward", help="train a reward model on preference pairs (torchrun for several processes)")
    add_training_options(p)
    p.set_defaults(func=cmd_reward)

    p = commands.add_parser("dpo", help="align a model on preference pairs with DPO (torchrun for several processes)")
    add_training_options(p)
    p.set_defaults(func=cmd_dpo)

    p = commands.add_parser(
        "ppo", help="RLHF: PPO against a reward model on sampled answers (torchrun for several processes)"
    )
    add_training_options(p)
    p.set_defaults(func=cmd_ppo)

    p = commands.add_parser(
        "grpo", help="GRPO: groups of sampled answers scored by reward functions (torchrun for several processes)"
    )
    add_training_options(p)
    p.set_defaults(func=cmd_grpo)

    p = commands.add_parser("chat", help="talk to a model in the terminal (one message per line from a pipe)")
    p.add_argument("--model", required=True, help="a model folder with its tokenizer (e.g. runs/sft/model)")
    p.add_argument("--system", default=None, help="a system message that starts the conversation")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="longest reply in tokens (default: half the model's block size, at most 256)",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_chat)

    p = commands.add_parser("ladder", help="scaling and emergence: train and evaluate a ladder of model sizes")
    p.add_argument("--preset", default="default", help="quick (<= 20 min on a 2-core CPU) | default | gpu")
    add_config_options(p, "a TOML file on top of the preset")
    p.add_argument("--out", required=True, help="ladder folder: runs/, ladder.json, report.md and plots; resumable")
    p.set_defaults(func=cmd_ladder)

    p = commands.add_parser("eval", help="few-shot / CoT / multiple-choice evaluation (lm-eval's contract and prompts)")
    p.add_argument("--model", required=True, help="a model folder (or, with --backend openai, the served model's name)")
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated: mmlu, gsm8k, world_mmlu, arith_{op}_{digits} (arith_3, arith: groups), "
        "words_{task} (words: all), world_instruct, ppl, or a .toml task file",
    )
    p.add_argument("--data", help="what the tasks read: a TinyWorld folder, an MMLU folder, a GSM8K JSONL, a text file")
    p.add_argument(
        "--shots",
        default="0",
        help="comma-separated shot counts, e.g. 0,1,5 (with several, results are keyed by '5-shot')",
    )
    p.add_argument("--cot", action="store_true", help="chain-of-thought exemplars and answer regex (arith tasks)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="ask generation tasks through the model's chat template, shots as earlier turns",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="first N test documents of each task (per subject for MMLU and world_mmlu, per family for world_instruct)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random few-shot picks")
    p.add_argument("--backend", default="gptlab", choices=["gptlab", "hf", "openai"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--base-url", default=None, help="the server for --backend openai, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--out", help="results JSON (metrics, stderr, n, config); without it, only the table is printed")
    p.add_argument("--samples", default=None, help="per-sample JSONL (prediction, target, correct, log-probs)")
    p.set_defaults(func=cmd_eval)

    p = commands.add_parser("report", help="write a run folder's report.md and plots (no training)")
    p.add_argument(
        "folder",
        help="a folder written by `gptlab ladder`, `pretrain` or `sft`, or one holding such folders (a demo's)",
    )
    p.set_defaults(func=cmd_report)

    p = commands.add_parser("serve", help="an OpenAI-compatible server (continuous batching) and a chat page")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a model folder to serve, under NAME or else under the path as given (repeatable; optional with --arena)",
    )
    p.add_argument(
        "--arena",
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME=DIR,...",
        help="two or more models for the arena page at /arena, comma- or space-separated (served on /v1 too)",
    )
    p.add_argument("--arena-db", default="arena.db", metavar="FILE", help="the SQLite file the arena's votes go to")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ and /arena/api/ requests"
    )
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together per model")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: the model's window)")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="most tokens per reply (default: what the window leaves)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_serve)

    add_arena_parser(commands)

    p = commands.add_parser("demo", help="the whole pipeline on TinyWorld -> OUT/report.md")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--preset", default="quick", help="quick (2 min on a 2-core CPU) | default (about 25 min)")
    p.add_argument("--seed", type=int, default=0, help="seeds the world, the models' initialization and data order")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="run the demo on seeds SEED .. SEED+N-1 into OUT/seed-S/, and write OUT/report.md: each claim across "
        "the seeds, pooled (a finished seed is kept)",
    )
    p.set_defaults(func=cmd_demo)
    return parser


def add_arena_parser(commands) -> None:
    """`gptlab arena run | board | import | export`."""
    arena = commands.add_parser(
        "arena", help="battles between models, judged, rated with Elo and Bradley-Terry (Chatbot Arena's conventions)"
    )
    actions = arena.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = actions.add_parser("run", help="play battles between model folders, judged, into a database")
    p.add_argument("--models", required=True, metavar="NAME=DIR,...", help="two or more chat models, comma-separated")
    p.add_argument("--prompts", required=True, help="JSONL: a 'prompt' (text or messages) or 'messages' per line")
    p.add_argument(
        "--judge", required=True, help="oracle (with --world), reward:DIR or llm:DIR (humans vote on serve --arena)"
    )
    p.add_argument("--battles", type=int, default=100, help="how many, spread evenly over the pairs of models")
    p.add_argument("--db", required=True, help="the arena's SQLite file (made if missing; battles are added to it)")
    p.add_argument("--world", default=None, help="the TinyWorld folder the oracle judges with")
    p.add_argument(
        "--judge-template",
        default=None,
        metavar="FILE",
        help="llm judge: a template with {question}, "
        "{answer_1}, {answer_2} (default: gptlab.arena.judges.DEFAULT_TEMPLATE)",
    )
    p.add_argument(
        "--tie-band", type=float, default=None, help="reward judge: a tie when |r_a - r_b| is below this (default 0.1)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the pairs, the sides and the prompts dealt")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="longest answer (default: half the block size, at most 256)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy answers")
    p.add_argument("--batch-size", type=int, default=32, help="prompts answered together")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_arena_run)

    p = actions.add_parser("board", help="the leaderboard: Bradley-Terry with 95%% intervals, Elo, win rates")
    p.add_argument("--db", required=True)
    p.add_argument(
        "--format", choices=["md", "json", "csv", "png"], default=None, help="default: from --out's suffix, else md"
    )
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap rounds of the intervals")
    p.add_argument("--seed", type=int, default=0, help="seeds the bootstrap")
    p.add_argument("--out", default=None, help="write the board here (png needs it) instead of printing it")
    p.set_defaults(func=cmd_arena_board)

    for action, verb, func in (("import", "add", cmd_arena_import), ("export", "write", cmd_arena_export)):
        p = actions.add_parser(action, help=f"{verb} battles in FastChat's battle JSON")
        p.add_argument("--fastchat", required=True, metavar="FILE", help="a JSON list, or JSONL, of FastChat battles")
        p.add_argument("--db", required=True)
        p.set_defaults(func=func)


def path_problem(e: OSError) -> str:
    """One line for a filesystem error on a path the user gave. A rename names its target second;
    a file where a folder must be (or the reverse) is named as such, where the OS says only
    "Not a directory", "File exists" or "Is a directory"."""
    name = e.filename2 if e.filename2 is not None else e.filename
    path = Path(os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else str(name))
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        blocking = next((p for p in (path, *path.parents) if (p.exists() or p.is_symlink()) and not p.is_dir()), None)
        if blocking == path:
            return f"{path} is a file where a folder is needed; choose another path"
        if blocking is not None:
            return f"{path} needs {blocking} to be a folder, but it is a file; choose another path"
    if e.errno == errno.EISDIR:
        return f"{path} is a folder where a file is needed; choose another path"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write {path}: {e.strerror}; free some space there or choose another path"
    if e.errno in (errno.EROFS, errno.EIO, errno.EFBIG):
        return f"cannot write {path}: {e.strerror}; choose another path"
    return f"cannot use {path}: {e.strerror}; check that path or choose another"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"gptlab: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug, so its traceback helps
            raise
        print(f"gptlab: error: {path_problem(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
