"""TinyWorld's size knobs: one dataclass, three presets, and the checks that keep every split non-empty.

Which knob shows which phenomenon is documented in docs/tinyworld.md; the comments below say it
in one line each. The fields are plain ints, floats, strings and lists (no tuples), so a config
built with ``gptlab.config.build(WorldSize, {...})`` from TOML or ``--set`` works unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from gptlab.errors import UserError


@dataclass(frozen=True)
class Mixture:
    """Relative shares (by characters) of the corpus families other than biographies."""

    qa: float = 0.12  # questions and answers about train-split people (free form and MMLU form)
    arith: float = 0.2  # bare equations "Q: 12+35=? A: 47."
    arith_worked: float = 0.2  # worked digit-by-digit solutions ending in "The answer is N."
    words: float = 0.4  # bursty in-context episodes of word tasks
    prose: float = 0.08  # plain prose about the countries, cities, companies and universities


@dataclass(frozen=True)
class WorldSize:
    """Every size TinyWorld's generator uses. ``PRESETS`` holds the named ones."""

    # The invented world. More people = more facts to store; the world_mmlu sets grow with it.
    n_countries: int = 8
    n_cities: int = 40
    n_companies: int = 40
    n_universities: int = 12
    n_jobs: int = 30
    n_people: int = 2000
    test_fraction: float = 0.2  # people whose questions appear only in benchmarks and test sets
    val_fraction: float = 0.25  # of those, the share whose world_mmlu questions form `val`
    # Knowledge augmentation: paraphrases per person. Facts stated once are memorised but not
    # extractable by questions about held-out people; several paraphrases make them extractable.
    bios_per_person: int = 8
    # The rest of the corpus (everything but biographies), in millions of characters, and its mix.
    corpus_mb: float = 15.0
    mixture: Mixture = field(default_factory=Mixture)
    qa_mc_fraction: float = 0.3  # share of QA documents in MMLU's multiple-choice form
    # Arithmetic: operands of 1..max_digits digits (multiplication up to max_mul_digits); the
    # benchmark tasks are add_k, sub_k for k = 2..max_digits and mul_k for k = 2..max_mul_digits.
    max_digits: int = 5
    max_mul_digits: int = 3
    arith_test: int = 200  # test problems per arithmetic task
    arith_fewshot: int = 10  # few-shot (and chain-of-thought) exemplars per arithmetic task
    # Word tasks: training words, held-out test words, lines per in-context episode.
    n_words: int = 4000
    word_test: int = 200
    word_fewshot: int = 16
    episode_min_lines: int = 2
    episode_max_lines: int = 8
    named_episode_fraction: float = 0.2  # episodes headed by the task's name (links instructions to skills)
    # Instructions and preferences.
    sft_train: int = 10000
    sft_test_per_family: int = 50
    sft_held_out: list[str] = field(default_factory=lambda: ["city_country", "subtract", "swap_ends"])
    multi_turn_fraction: float = 0.15
    system_prompt_fraction: float = 0.2
    prefs_train: int = 5000
    prefs_test_per_family: int = 20

    # ------------------------------------------------------------------------- derived sizes

    @property
    def n_test_people(self) -> int:
        return round(self.n_people * self.test_fraction)

    @property
    def n_val_people(self) -> int:
        return round(self.n_test_people * self.val_fraction)

    @property
    def n_train_people(self) -> int:
        return self.n_people - self.n_test_people


PRESETS: dict[str, WorldSize] = {
    # 2 MB of corpus: tokenizer, shards and a short pretraining fit in the 5-minute demo on 2 CPU cores.
    "quick": WorldSize(
        n_countries=6,
        n_cities=24,
        n_companies=20,
        n_universities=8,
        n_jobs=20,
        n_people=400,
        bios_per_person=6,
        corpus_mb=1.5,
        max_digits=3,
        max_mul_digits=2,
        arith_test=100,
        arith_fewshot=8,
        n_words=1500,
        word_test=100,
        word_fewshot=16,
        sft_train=2000,
        sft_test_per_family=20,
        prefs_train=1000,
        prefs_test_per_family=10,
    ),
    # 18 MB of corpus: the world of the demo and the ladder.
    "default": WorldSize(),
    # 116 MB of corpus: more people, more words, 4-digit multiplication; for GPUs.
    "large": WorldSize(
        n_countries=12,
        n_cities=80,
        n_companies=100,
        n_universities=24,
        n_jobs=34,
        n_people=10000,
        bios_per_person=8,
        corpus_mb=100.0,
        max_mul_digits=4,
        arith_test=500,
        n_words=20000,
        word_test=500,
        sft_train=50000,
        sft_test_per_family=100,
        prefs_train=20000,
        prefs_test_per_family=50,
    ),
}


def resolve_preset(preset: str | WorldSize) -> tuple[str, WorldSize]:
    """Return (name, sizes) for a preset name or a custom ``WorldSize`` (named "custom")."""
    if isinstance(preset, WorldSize):
        return "custom", preset
    if preset not in PRESETS:
        raise UserError(f"unknown TinyWorld preset {preset!r}: there is no such size; use one of {', '.join(PRESETS)}")
    return preset, PRESETS[preset]


def check_sizes(size: WorldSize, families: list[str], max_jobs: int) -> None:
    """Refuse sizes that would leave a split or a multiple-choice question without enough items.

    ``families`` are the instruction families that exist, ``max_jobs`` the number of job names
    the generator knows.
    """

    def need(ok: bool, what: str, fix: str) -> None:
        if not ok:
            raise UserError(f"TinyWorld sizes: {what}; {fix}")

    for f in dataclasses.fields(size):
        value = getattr(size, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            need(
                value >= 0 and math.isfinite(value), f"{f.name} = {value} is negative or not finite", "use a value >= 0"
            )
    for f in dataclasses.fields(size.mixture):
        value = getattr(size.mixture, f.name)
        need(
            value >= 0 and math.isfinite(value),
            f"mixture.{f.name} = {value} is negative or not finite",
            "use a weight >= 0",
        )
    need(
        sum(dataclasses.astuple(size.mixture)) > 0, "all mixture weights are 0", "give at least one family a weight > 0"
    )
    for name in ("n_countries", "n_cities", "n_companies", "n_universities", "n_jobs"):
        need(
            getattr(size, name) >= 4,
            f"{name} = {getattr(size, name)} leaves fewer than 4 choices for a 4-choice question",
            f"set {name} >= 4",
        )
    need(
        size.n_jobs <= max_jobs,
        f"n_jobs = {size.n_jobs} exceeds the {max_jobs} job names TinyWorld knows",
        f"set n_jobs <= {max_jobs}",
    )
    need(
        size.n_cities >= size.n_countries,
        f"n_cities = {size.n_cities} leaves a country without a city",
        "set n_cities >= n_countries",
    )
    need(
        size.n_train_people >= 5,
        f"{size.n_train_people} train-split people cannot give 5 dev questions per subject",
        "raise n_people or lower test_fraction",
    )
    need(
        size.n_val_people >= 1,
        f"{size.n_test_people} held-out people leave world_mmlu val empty",
        "raise n_people, test_fraction or val_fraction",
    )
    need(
        size.n_test_people - size.n_val_people >= 1,
        "no held-out people are left for world_mmlu test",
        "raise n_people or test_fraction, or lower val_fraction",
    )
    need(size.bios_per_person >= 1, "bios_per_person = 0 leaves facts unlearnable", "set bios_per_person >= 1")
    need(
        size.corpus_mb > 0,
        "corpus_mb = 0 leaves the corpus without arithmetic, word tasks or prose",
        "set corpus_mb > 0",
    )
    need(
        2 <= size.max_mul_digits <= size.max_digits <= 9,
        f"max_digits = {size.max_digits}, max_mul_digits = {size.max_mul_digits} give no arithmetic benchmark",
        "use 2 <= max_mul_digits <= max_digits <= 9",
    )
    # 2-digit tasks have 4095 operand pairs; reserving more than a quarter would starve the corpus.
    reserved = size.arith_test + size.sft_test_per_family + size.prefs_test_per_family
    need(
        size.arith_test >= 1 and reserved <= 1000,
        f"arith_test + sft_test_per_family + prefs_test_per_family = {reserved} reserves too many 2-digit problems",
        "keep arith_test >= 1 and that sum <= 1000",
    )
    need(size.arith_fewshot >= 1, "arith_fewshot = 0 leaves no few-shot exemplars", "set arith_fewshot >= 1")
    need(size.word_test >= 1 and size.word_fewshot >= 1, "word_test or word_fewshot is 0", "set both >= 1")
    need(
        size.n_words >= max(size.word_fewshot, size.episode_max_lines, 10),
        f"n_words = {size.n_words} is too few training words",
        "set n_words >= 10",
    )
    need(
        1 <= size.episode_min_lines <= size.episode_max_lines,
        "episode_min_lines must be in 1..episode_max_lines",
        "fix the episode line counts",
    )
    need(
        size.sft_train >= 1 and size.sft_test_per_family >= 1, "sft_train or sft_test_per_family is 0", "set both >= 1"
    )
    need(
        size.prefs_train >= 1 and size.prefs_test_per_family >= 1,
        "prefs_train or prefs_test_per_family is 0",
        "set both >= 1",
    )
    unknown = [f for f in size.sft_held_out if f not in families]
    need(not unknown, f"sft_held_out names unknown families {unknown}", f"choose from {', '.join(families)}")
    need(
        len(set(size.sft_held_out)) < len(families),
        "sft_held_out holds out every family, leaving sft train empty",
        "hold out fewer families",
    )
    for name in (
        "test_fraction",
        "val_fraction",
        "qa_mc_fraction",
        "named_episode_fraction",
        "multi_turn_fraction",
        "system_prompt_fraction",
    ):
        need(getattr(size, name) <= 1, f"{name} = {getattr(size, name)} is above 1", "use a fraction in [0, 1]")
