"""``write_world``: generate every TinyWorld file into a folder, deterministically.

Each part of the world draws from its own ``random.Random`` stream named after the seed and the
part, so the same seed gives byte-identical files and changing one part's size leaves the
others' streams alone. Nothing depends on set order, time, paths or the host.

Files are generated into a sibling staging folder and moved into place at the end, so a failed
run leaves an earlier world untouched.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

from gptlab.errors import UserError
from gptlab.fileio import remove_stale, write_error
from gptlab.world.arith import ArithSampler, Reservation, bench_record, tasks
from gptlab.world.facts import (
    ATTRIBUTES,
    JOBS,
    WORLD_FORMAT,
    World,
    biographies,
    build_world,
    mmlu_sets,
    prose_documents,
    qa_documents,
)
from gptlab.world.families import FAMILIES, Facts, Sources
from gptlab.world.instructions import fixed_texts, preference_sets, sft_sets
from gptlab.world.oracle import CORRECT_WEIGHT, STYLE_RULES, STYLE_WEIGHT, Oracle
from gptlab.world.presets import WorldSize, check_sizes, resolve_preset
from gptlab.world.words import TASKS, WordPools, episodes, example

OWNED = ("world.json", "corpus", "bench", "sft", "prefs")  # what a world folder holds; world.json marks it
_WORD = re.compile(r"[a-z]+")


def write_world(
    out_dir: str | os.PathLike, seed: int = 0, preset: str | WorldSize = "default", force: bool = False
) -> dict[str, Any]:
    """Write TinyWorld into ``out_dir`` and return its summary (counts per file and split).

    ``preset`` is "quick", "default", "large" or a custom ``WorldSize``. A folder holding a
    previous world (it has world.json) is overwritten; any other non-empty folder is refused
    unless ``force``, which replaces only TinyWorld's own entries (``OWNED``) in it.
    """
    name, size = resolve_preset(preset)
    check_sizes(size, [f.name for f in FAMILIES], len(JOBS))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"TinyWorld seed {seed!r} is not an integer: give an integer seed such as 0")
    out = Path(out_dir).resolve()
    _check_out_dir(out, force)
    # Named with the process id: what a killed run left, the next run removes.
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    remove_stale(out.parent, rf"\.{re.escape(out.name)}\.staging-(?P<pid>\d+)")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
    except OSError as e:
        raise UserError(
            f"cannot create a folder next to {out} ({e.strerror}): choose an --out in a writable place"
        ) from None
    try:
        summary = _generate(staging, seed, name, size)
        _install(staging, out)
    except BaseException as e:
        error = write_error(e, out, staged=staging)  # before the clean-up frees the space it measures
        if error is not None:
            raise error from e
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few lines for a terminal."""
    people = summary["people"]
    corpus = ", ".join(f"{f} {v['bytes'] / 1e6:.2f} MB" for f, v in summary["corpus"].items())
    corpus_mb = sum(v["bytes"] for v in summary["corpus"].values()) / 1e6
    mmlu = summary["world_mmlu"]
    return "\n".join(
        [
            f"TinyWorld seed {summary['seed']}, preset {summary['preset']}: {sum(people.values())} people "
            f"({people['train']} train, {people['val'] + people['test']} held out)",
            f"corpus      {corpus_mb:.1f} MB: {corpus}",
            f"world_mmlu  {len(ATTRIBUTES)} subjects: "
            f"dev {mmlu['dev']}, val {mmlu['val']}, test {mmlu['test']} questions",
            f"arith       {', '.join(f'{t} {n}' for t, n in summary['arith'].items())} test problems",
            f"words       {', '.join(f'{t} {n}' for t, n in summary['words'].items())} test words",
            f"sft         train {summary['sft']['train']}, test {summary['sft']['test']} "
            f"(held-out families: {', '.join(summary['sft']['held_out']) or 'none'})",
            f"prefs       train {summary['prefs']['train']}, test {summary['prefs']['test']} pairs",
            f"total       {summary['bytes'] / 1e6:.1f} MB",
        ]
    )


# ----------------------------------------------------------------------------- generation


def _generate(root: Path, seed: int, preset: str, size: WorldSize) -> dict[str, Any]:
    """Write every file of the world into ``root`` and return its summary."""
    world = build_world(size, _stream(seed, "world"))
    reservation = Reservation(size, _stream(seed, "arith-reserved"))
    # One arith stream serves the corpus, then the benchmarks' shots, then the SFT data: the
    # order of these phases is part of the world's bytes.
    arith = ArithSampler(size, reservation, _stream(seed, "arith"))
    corpus, words = _corpus(size, world, arith, seed)
    files = _corpus_files(corpus)
    bench_files, bench_counts = _benchmarks(size, world, reservation, arith, words, seed)
    files.update(bench_files)
    chat_files, chat_counts = _instruction_data(size, world, arith, reservation, words, seed)
    files.update(chat_files)
    summary = {
        "seed": seed,
        "preset": preset,
        "people": {
            "train": size.n_train_people,
            "val": size.n_val_people,
            "test": size.n_test_people - size.n_val_people,
        },
        "corpus": {
            name: {"documents": len(docs), "bytes": len(files[f"corpus/{name}"].encode())}
            for name, docs in sorted(corpus.items())
        },
        **bench_counts,
        **chat_counts,
        "bytes": sum(len(text.encode()) for text in files.values()),
    }
    files["world.json"] = _world_json(seed, preset, size, world, summary)
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return summary


def _stream(seed: int, part: str) -> random.Random:
    return random.Random(f"tinyworld:{seed}:{part}")


def _corpus(size: WorldSize, world: World, arith: ArithSampler, seed: int) -> tuple[dict[str, list[str]], WordPools]:
    """The corpus documents per file, and the word pools (their training words are in words.txt)."""
    corpus = {
        "bios.txt": biographies(world, size.bios_per_person, _stream(seed, "bios")),
        "qa.jsonl": qa_documents(world, _budget(size, "qa"), size.qa_mc_fraction, _stream(seed, "qa")),
        "arith.txt": arith.bare_documents(_budget(size, "arith")),
        "arith_worked.txt": arith.worked_documents(_budget(size, "arith_worked")),
        "prose.txt": prose_documents(world, _budget(size, "prose"), _stream(seed, "prose")),
    }
    # Held-out words must be no word of any other text, so they are made once those exist.
    taken = set(_WORD.findall("\n".join(fixed_texts()).lower()))
    for docs in corpus.values():
        taken.update(_WORD.findall("\n".join(docs).lower()))
    words = WordPools.make(size, taken, _stream(seed, "words"))
    corpus["words.txt"] = episodes(size, words.train, _budget(size, "words"), _stream(seed, "episodes"))
    return corpus, words


def _budget(size: WorldSize, family: str) -> int:
    """A corpus family's bytes: its share of the mixture's weights."""
    weights = dataclasses.asdict(size.mixture)
    return int(size.corpus_mb * 1e6 * weights[family] / sum(weights.values()))


def _corpus_files(corpus: dict[str, list[str]]) -> dict[str, str]:
    files: dict[str, str] = {}
    for name, docs in sorted(corpus.items()):
        if name.endswith(".jsonl"):
            files[f"corpus/{name}"] = _jsonl({"text": d} for d in docs)
        else:
            files[f"corpus/{name}"] = "\n\n".join(docs) + "\n"
    return files


def _benchmarks(
    size: WorldSize, world: World, reservation: Reservation, arith: ArithSampler, words: WordPools, seed: int
) -> tuple[dict[str, str], dict[str, Any]]:
    """The bench/ files, and the summary's counts of their test items."""
    files: dict[str, str] = {}
    mmlu = mmlu_sets(world, _stream(seed, "world_mmlu"))
    for split, subjects in mmlu.items():
        for subject, questions in subjects.items():
            files[f"bench/world_mmlu/{split}/{subject}_{split}.csv"] = _csv(q.row() for q in questions)
    for task in tasks(size):
        files[f"bench/arith/{task}_test.jsonl"] = _jsonl(bench_record(p) for p in reservation.bench[task])
        files[f"bench/arith/{task}_fewshot.jsonl"] = _jsonl(bench_record(p) for p in arith.fewshot(task))
    word_rng = _stream(seed, "bench-words")
    for task in TASKS:
        for split, pool in (("test", words.test), ("fewshot", word_rng.sample(words.train, size.word_fewshot))):
            files[f"bench/words/{task.name}_{split}.jsonl"] = _jsonl(
                dict(zip(("input", "output"), example(task, w, word_rng))) for w in pool
            )
    counts = {
        "world_mmlu": {split: sum(len(q) for q in subjects.values()) for split, subjects in mmlu.items()},
        "arith": {task: len(reservation.bench[task]) for task in tasks(size)},
        "words": {task.name: len(words.test) for task in TASKS},
    }
    return files, counts


def _instruction_data(
    size: WorldSize, world: World, arith: ArithSampler, reservation: Reservation, words: WordPools, seed: int
) -> tuple[dict[str, str], dict[str, Any]]:
    """The sft/ and prefs/ files, and the summary's counts of their records."""
    people = {split: world.people_in(split) for split in ("train", "test")}
    sources = Sources(Facts(world), arith, reservation, words, _city_split(world, seed), people)
    sft_train, sft_test = sft_sets(size, sources, _stream(seed, "sft"))
    prefs_train, prefs_test = preference_sets(size, sources, Oracle(world), _stream(seed, "prefs"))
    records = {"sft/train": sft_train, "sft/test": sft_test, "prefs/train": prefs_train, "prefs/test": prefs_test}
    files = {f"{name}.jsonl": _jsonl(split) for name, split in records.items()}
    counts = {
        "sft": {"train": len(sft_train), "test": len(sft_test), "held_out": list(size.sft_held_out)},
        "prefs": {"train": len(prefs_train), "test": len(prefs_test)},
    }
    return files, counts


def _city_split(world: World, seed: int) -> dict[str, list[str]]:
    """The cities SFT data asks about in training, and the third (at least one) kept for its test."""
    city_names = [c.name for c in world.cities]
    _stream(seed, "cities").shuffle(city_names)
    held = max(1, len(city_names) // 3)
    return {"train": city_names[held:], "test": city_names[:held]}


def _world_json(seed: int, preset: str, size: WorldSize, world: World, summary: dict[str, Any]) -> str:
    meta = {
        "format": WORLD_FORMAT,
        "seed": seed,
        "preset": preset,
        "sizes": dataclasses.asdict(size),
        "summary": summary,
        "benchmarks": {
            "world_mmlu": [a.subject for a in ATTRIBUTES],
            "arith": tasks(size),
            "words": [t.name for t in TASKS],
        },
        "sft": {"families": [f.name for f in FAMILIES], "held_out": list(size.sft_held_out)},
        "oracle": {"style_rules": STYLE_RULES, "weights": {"correct": CORRECT_WEIGHT, "style": STYLE_WEIGHT}},
        **world.to_json(),
    }
    return json.dumps(meta, indent=1, ensure_ascii=False) + "\n"


def _jsonl(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _csv(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- the folder


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder: give --out a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "world.json").is_file() and not force:
        raise UserError(
            f"{out} is not empty and holds no TinyWorld (no world.json), so writing there could "
            f"destroy other files: choose a new or empty folder, or pass --force"
        )


def _install(staging: Path, out: Path) -> None:
    """Move the staged world into ``out``, replacing only TinyWorld's own entries; world.json
    goes last, so a folder with world.json always holds a complete world."""
    if not out.exists():
        staging.rename(out)
        return
    for name in OWNED:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    for name in reversed(OWNED):
        (staging / name).rename(out / name)
