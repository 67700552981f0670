"""TinyWorld: determinism, no leakage between training data and tests, file formats, the oracle,
and clear errors. Worlds here use a tiny custom size so the whole file runs in seconds."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import random
import re
from pathlib import Path

import pytest

from gptlab.data import iter_documents
from gptlab.errors import UserError
from gptlab.eval.tasks import mmlu_question, read_mmlu_csv
from gptlab.world import PRESETS, Mixture, Oracle, format_summary, write_world
from gptlab.world.arith import Problem, worked
from gptlab.world.families import FAMILIES, FAMILY_BY_NAME, template_regex
from gptlab.world.oracle import CORRUPTIONS
from gptlab.world.words import TASK_BY_NAME
from helpers import ROOT, TINY_WORLD, assert_one_line, run_python

ARITH = re.compile(r"(\d+)([+*-])(\d+)=")
OPS = {"+": "add", "-": "sub", "*": "mul"}


def hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def text_of(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world") / "w"
    write_world(root, seed=3, preset=TINY_WORLD)
    return root


@pytest.fixture(scope="module")
def meta(world: Path) -> dict:
    return json.loads((world / "world.json").read_text())


@pytest.fixture(scope="module")
def corpus_text(world: Path) -> str:
    return "\n\n".join(iter_documents(world / "corpus"))


@pytest.fixture(scope="module")
def train_chat_text(world: Path) -> str:
    """Everything a model is trained on besides the corpus: SFT and preference training data."""
    sft = [text_of(r["messages"]) for r in read_jsonl(world / "sft/train.jsonl")]
    prefs = [text_of(r["prompt"] + r["chosen"] + r["rejected"]) for r in read_jsonl(world / "prefs/train.jsonl")]
    return "\n".join(sft + prefs)


@pytest.fixture(scope="module")
def oracle(world: Path) -> Oracle:
    return Oracle(world)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(world: Path, tmp_path: Path):
    """The same world from another interpreter with another string-hash seed: set and dict orders that
    depend on PYTHONHASHSEED (the same in one process) would show here."""
    child_seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    write = "import sys; from helpers import TINY_WORLD; from gptlab.world import write_world; "
    write += "write_world(sys.argv[1], seed=3, preset=TINY_WORLD)"
    env = {"PYTHONHASHSEED": child_seed, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    run_python("-c", write, tmp_path / "again", env=env, check=True)
    write_world(tmp_path / "other", seed=4, preset=TINY_WORLD)
    first, again, other = hashes(world), hashes(tmp_path / "again"), hashes(tmp_path / "other")
    assert first == again
    assert set(first) == set(other)
    for name in (
        "world.json",
        "corpus/bios.txt",
        "corpus/words.txt",
        "bench/arith/add_3_test.jsonl",
        "sft/train.jsonl",
        "prefs/test.jsonl",
    ):
        assert first[name] != other[name], name


def test_summary_matches_the_files(world: Path, meta: dict):
    summary = meta["summary"]
    docs = {name: list(iter_documents(world / "corpus" / name)) for name in summary["corpus"]}
    assert {n: len(d) for n, d in docs.items()} == {n: v["documents"] for n, v in summary["corpus"].items()}
    assert summary["sft"]["train"] == TINY_WORLD.sft_train == len(read_jsonl(world / "sft/train.jsonl"))
    assert summary["prefs"]["test"] == len(FAMILIES) * TINY_WORLD.prefs_test_per_family
    assert summary["people"] == {"train": 45, "val": 6, "test": 9}
    text = format_summary(summary)
    assert "60 people (45 train, 15 held out)" in text and "add_3 20" in text and "swap_ends" in text


# ----------------------------------------------------------------------------- the world


def test_world_json_has_people_with_facts_and_splits(meta: dict):
    people = meta["people"]
    assert len(people) == TINY_WORLD.n_people and len({p["name"] for p in people}) == len(people)
    cities = {c["name"]: c["country"] for c in meta["cities"]}
    for p in people:
        assert p["split"] in ("train", "test")
        assert p["bench"] == (None if p["split"] == "train" else p["bench"]) and p["bench"] in (None, "val", "test")
        assert cities[p["birth_city"]] == p["birth_country"]
        assert p["job"] in meta["jobs"] and 1900 <= p["birth_year"] <= 1999
    assert meta["seed"] == 3 and meta["preset"] == "custom" and meta["sizes"]["n_people"] == 60
    assert meta["sft"]["held_out"] == TINY_WORLD.sft_held_out


def test_names_are_invented_pronounceable_and_unique(meta: dict):
    names = (
        meta["countries"]
        + [c["name"] for c in meta["cities"]]
        + [c["name"].split()[0] for c in meta["companies"]]
        + [u["name"].split()[0] for u in meta["universities"]]
    )
    assert len(set(names)) == len(names)
    for name in names + [w for p in meta["people"] for w in p["name"].split()]:
        assert re.fullmatch(r"[A-Z][a-z]{3,}", name), name
        assert not re.search(r"[^aeiou]{4}|(.)\1\1", name.lower()), name


# ----------------------------------------------------------------------------- leakage


def test_every_person_has_several_biographies(world: Path, meta: dict):
    bios = list(iter_documents(world / "corpus/bios.txt"))
    for person in meta["people"]:
        mine = [b for b in bios if re.match(re.escape(person["name"]) + r"\b", b)]
        assert len(mine) == len(set(mine)) == TINY_WORLD.bios_per_person
        assert all(str(person["birth_year"]) in b and person["employer"] in b for b in mine)


def test_held_out_people_are_only_in_biographies(world: Path, meta: dict, train_chat_text: str):
    other = "\n".join(
        iter_documents(
            [world / "corpus" / n for n in ("qa.jsonl", "prose.txt", "arith.txt", "arith_worked.txt", "words.txt")]
        )
    )
    for person in meta["people"]:
        if person["split"] == "test":
            assert person["name"] not in other and person["name"] not in train_chat_text


def test_world_mmlu_test_questions_never_appear_in_training_data(world: Path, corpus_text: str, train_chat_text: str):
    for split in ("val", "test"):
        for path in sorted((world / "bench/world_mmlu" / split).glob("*.csv")):
            for row in csv.reader(path.open()):
                assert row[0] not in corpus_text and row[0] not in train_chat_text


def arithmetic_keys(text: str) -> set[tuple[str, int, int]]:
    return {Problem(OPS[op], int(a), int(b)).key for a, op, b in ARITH.findall(text)}


def test_arithmetic_test_pairs_never_occur_in_training_data(world: Path, corpus_text: str, train_chat_text: str):
    trained = arithmetic_keys(corpus_text) | arithmetic_keys(train_chat_text)
    assert len(trained) > 500  # the regex does find the training problems and their steps
    held_out = set()
    for path in sorted((world / "bench/arith").glob("*_test.jsonl")):
        held_out |= arithmetic_keys("\n".join(r["question"] for r in read_jsonl(path)))
    for name in ("sft/test.jsonl", "prefs/test.jsonl"):
        for record in read_jsonl(world / name):
            if record["family"] in ("add", "subtract", "multiply"):
                question = (
                    record["messages"][-2]["content"] if "messages" in record else record["prompt"][-1]["content"]
                )
                a, b = re.findall(r"\d+", question)
                held_out.add(
                    Problem({"add": "add", "subtract": "sub", "multiply": "mul"}[record["family"]], int(a), int(b)).key
                )
    assert len(held_out) >= 5 * TINY_WORLD.arith_test
    assert not trained & held_out


def test_word_task_test_words_never_occur_in_training_data(world: Path, corpus_text: str, train_chat_text: str):
    trained = set(re.findall(r"[a-z]+", (corpus_text + train_chat_text).lower()))
    for path in sorted((world / "bench/words").glob("*_test.jsonl")):
        for record in read_jsonl(path):
            for word in re.findall(r"[a-z]+", record["input"]) + [record["output"]]:
                if len(word) > 1:  # random_insertion inputs split into single letters
                    assert word not in trained, (path.name, word)


# ----------------------------------------------------------------------------- formats


def test_world_mmlu_csvs_have_the_mmlu_layout(world: Path, meta: dict):
    people = {p["name"]: p for p in meta["people"]}
    subjects = meta["benchmarks"]["world_mmlu"]
    key = {
        "birthplaces": "birth_city",
        "birth_years": "birth_year",
        "universities": "university",
        "occupations": "job",
        "employers": "employer",
        "home_countries": "birth_country",
    }
    for split in ("dev", "val", "test"):
        assert sorted(p.name for p in (world / "bench/world_mmlu" / split).iterdir()) == sorted(
            f"{s}_{split}.csv" for s in subjects
        )
        for subject in subjects:
            rows = list(csv.reader((world / f"bench/world_mmlu/{split}/{subject}_{split}.csv").open(newline="")))
            assert len(rows) == (5 if split == "dev" else meta["summary"]["people"][split])
            for question, *choices, answer in rows:
                assert len(choices) == 4 and len(set(choices)) == 4 and answer in "ABCD"
                person = people[re.search(r"[A-Z][a-z]+ [A-Z][a-z]+", question).group()]
                assert choices["ABCD".index(answer)] == str(person[key[subject]])
                assert (person["split"], person["bench"]) == (("train", None) if split == "dev" else ("test", split))


def test_world_mmlu_dev_lists_its_shortest_questions_first(world: Path, meta: dict):
    """lm-eval takes the first k dev rows as the k shots: shortest first keeps k-shot prompts in the window."""
    for subject in meta["benchmarks"]["world_mmlu"]:
        rows = read_mmlu_csv(world / f"bench/world_mmlu/dev/{subject}_dev.csv")
        lengths = [len(mmlu_question(row)) for row in rows]
        assert lengths == sorted(lengths) and len(set(lengths)) > 1, (subject, lengths)


def test_all_jsonl_files_parse(world: Path):
    paths = sorted(world.rglob("*.jsonl"))
    assert len(paths) > 20
    for path in paths:
        assert read_jsonl(path), path


def test_arithmetic_records_are_gsm8k_style_and_correct(world: Path):
    tasks = json.loads((world / "world.json").read_text())["benchmarks"]["arith"]
    assert tasks == ["add_2", "add_3", "sub_2", "sub_3", "mul_2"]
    for task in tasks:
        op, digits = task.split("_")
        for split in ("test", "fewshot"):
            records = read_jsonl(world / f"bench/arith/{task}_{split}.jsonl")
            assert len(records) == (TINY_WORLD.arith_test if split == "test" else TINY_WORLD.arith_fewshot)
            for r in records:
                a, sym, b = re.fullmatch(r"(\d+)([+*-])(\d+)=\?", r["question"]).groups()
                assert OPS[sym] == op and len(a) == len(b) == int(digits)
                n = Problem(op, int(a), int(b)).answer
                assert r["answer"] == f"{r['rationale']}\n#### {n}"
                assert r["rationale"].startswith("Let's think step by step.") and r["rationale"].endswith(
                    f"The answer is {n}."
                )


@pytest.mark.parametrize(
    "a,op,b",
    [
        (347, "add", 285),
        (999, "add", 1),
        (432, "sub", 185),
        (1000, "sub", 999),
        (23, "mul", 45),
        (305, "mul", 107),
        (7, "mul", 8),
    ],
)
def test_worked_solutions_compute_each_step_correctly(a: int, op: str, b: int):
    rationale, inner = worked(Problem(op, a, b))
    steps = re.findall(r"(?<![\d+*-])((?:\d+[+*-])+\d+)=(-?\d+)", rationale)
    assert len(steps) >= min(len(str(a)), len(str(b)))
    for expression, result in steps:
        assert eval(expression) == int(result), (expression, result)  # digits and + - * only
    assert rationale.endswith(f"The answer is {Problem(op, a, b).answer}.")
    assert all(p.op in ("add", "mul") for p in inner)


def test_word_records_apply_their_task(world: Path):
    for name, task in TASK_BY_NAME.items():
        for split in ("test", "fewshot"):
            for r in read_jsonl(world / f"bench/words/{name}_{split}.jsonl"):
                if task.transform:
                    assert task.transform(r["input"]) == r["output"] != r["input"]
                else:
                    assert re.sub(r"[^a-z]", "", r["input"]) == r["output"] and re.fullmatch(
                        r"([a-z][^a-z])+[a-z]", r["input"]
                    )


def test_sft_data_follows_the_chat_schema_and_holds_families_out(world: Path, meta: dict):
    held_out = set(meta["sft"]["held_out"])
    for split in ("train", "test"):
        records = read_jsonl(world / f"sft/{split}.jsonl")
        for r in records:
            messages = r["messages"]
            roles = [m["role"] for m in messages]
            assert set(roles) <= {"system", "user", "assistant"} and "system" not in roles[1:]
            turns = roles[1:] if roles[0] == "system" else roles
            assert turns == ["user", "assistant"] * (len(turns) // 2) and turns
            assert all(isinstance(m["content"], str) and m["content"] for m in messages)
        families = {r["family"] for r in records}
        if split == "train":
            assert not families & held_out and any(len(r["messages"]) > 3 for r in records)
        else:
            assert families == set(meta["sft"]["families"])


def test_preference_pairs_follow_trl_format(world: Path):
    for split in ("train", "test"):
        for r in read_jsonl(world / f"prefs/{split}.jsonl"):
            assert r["prompt"][-1]["role"] == "user" and all(m["role"] in ("system", "user") for m in r["prompt"])
            assert [m["role"] for m in r["chosen"]] == [m["role"] for m in r["rejected"]] == ["assistant"]
            assert r["chosen"][0]["content"] != r["rejected"][0]["content"]


# ----------------------------------------------------------------------------- the oracle


def test_every_template_parses_back_to_its_family(oracle: Oracle, meta: dict):
    person, city = meta["people"][0]["name"], meta["cities"][0]["name"]
    slots = {"name": person, "city": city, "a": "12", "b": "7", "word": "plomet"}
    for family in FAMILIES:
        for template in family.templates:
            filled = {k: v for k, v in slots.items() if f"{{{k}}}" in template}
            if family.name == "random_insertion":
                filled = {"word": "p.l!o;m"}
            parsed = oracle.parse(template.format(**filled))
            assert parsed is not None and parsed[0] is family and parsed[1] == filled, template
            assert template_regex(template, family.patterns).fullmatch(template.format(**filled))


def test_oracle_prefers_the_reference_over_every_corruption(world: Path, oracle: Oracle):
    rng = random.Random(0)
    for r in read_jsonl(world / "sft/test.jsonl"):
        prompt, reference = r["messages"][:-1], r["messages"][-1]["content"]
        assert oracle.reference(prompt) == reference and oracle.correct(prompt, reference)
        assert all(oracle.style(prompt, reference).values())
        worse = oracle.corruptions(prompt, rng)
        assert list(worse) == list(CORRUPTIONS)
        for kind, answer in worse.items():
            assert oracle.score(prompt, reference) > oracle.score(prompt, answer), (kind, answer)
            assert oracle.judge(prompt, reference, answer) == "model_a", (kind, answer)
            assert oracle.judge(prompt, answer, reference) == "model_b", (kind, answer)
        assert oracle.correct(prompt, worse["wrong"]) is False


def test_oracle_agrees_with_every_preference_pair(world: Path, oracle: Oracle):
    for split in ("train", "test"):
        for r in read_jsonl(world / f"prefs/{split}.jsonl"):
            assert oracle.judge(r["prompt"], r["chosen"], r["rejected"]) == "model_a", r
            assert oracle.judge(r["prompt"], r["rejected"], r["chosen"]) == "model_b", r


def test_oracle_puts_correctness_before_style_and_reports_ties(oracle: Oracle, meta: dict):
    person = next(p for p in meta["people"] if p["split"] == "test")
    prompt = f"In which year was {person['name']} born?"
    right, wrong = (
        f"{person['name']} was born in {person['birth_year']}.",
        f"{person['name']} was born in {person['birth_year'] + 1}.",
    )
    sloppy = f"well i think it was {person['birth_year']} {person['birth_year']}"
    assert oracle.judge(prompt, sloppy, wrong) == "model_a"
    assert oracle.judge(prompt, wrong, wrong + " " + wrong) == "tie (bothbad)"
    assert oracle.judge(prompt, right, right) == "tie"
    assert oracle.judge(prompt, f"{person['birth_year']}.", right) == "tie"  # a bare value is as good
    assert 0.0 <= oracle.score(prompt, wrong) < 0.6 <= oracle.score(prompt, sloppy) < oracle.score(prompt, right) == 1.0
    # Messages work as well as strings; an unknown prompt is judged on style alone.
    assert (
        oracle.judge([{"role": "user", "content": prompt}], {"role": "assistant", "content": right}, wrong) == "model_a"
    )
    assert oracle.reference("What is the meaning of life?") is None and oracle.correct("Hi", "Hello.") is None
    assert oracle.judge("What is the meaning of life?", "Forty-two.", "Sure! forty-two") == "model_a"
    assert oracle.parse(prompt.replace(person["name"], "Nobody Atall")) is None


def test_oracle_noise_flips_about_that_share_of_verdicts_reproducibly(world: Path):
    prompt, good, bad = "What is 12+7?", "The answer is 19.", "The answer is 18."
    noisy = Oracle(world, noise=0.3, seed=1)
    verdicts = [noisy.judge(prompt, good, bad) for _ in range(3000)]
    assert set(verdicts) == {"model_a", "model_b"}
    assert abs(verdicts.count("model_b") / len(verdicts) - 0.3) < 0.03
    again = Oracle(world, noise=0.3, seed=1)
    assert [again.judge(prompt, good, bad) for _ in range(3000)] == verdicts
    assert {Oracle(world).judge(prompt, good, bad) for _ in range(50)} == {"model_a"}


# ----------------------------------------------------------------------------- the folder and errors


def test_a_previous_world_is_overwritten_and_other_folders_are_refused(world: Path, tmp_path: Path):
    out = tmp_path / "w"
    write_world(out, seed=3, preset=TINY_WORLD)
    stale = out / "bench/arith/mul_9_test.jsonl"
    stale.write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    write_world(out, seed=3, preset=TINY_WORLD)
    assert not stale.exists() and (out / "notes.txt").read_text() == "mine"
    assert hashes(out) == {**hashes(world), "notes.txt": hashes(out)["notes.txt"]}

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("precious")
    with pytest.raises(UserError) as error:
        write_world(busy, preset=TINY_WORLD)
    assert_one_line(error, str(busy), "not empty", "--force")
    assert sorted(p.name for p in busy.iterdir()) == ["thesis.tex"]
    write_world(busy, preset=TINY_WORLD, force=True)
    assert (busy / "world.json").is_file() and (busy / "thesis.tex").read_text() == "precious"

    with pytest.raises(UserError) as error:
        write_world(busy / "thesis.tex", preset=TINY_WORLD)
    assert_one_line(error, "is a file")
    with pytest.raises(UserError) as error:
        write_world(busy / "thesis.tex" / "w", preset=TINY_WORLD)
    assert_one_line(error, "cannot create")


@pytest.mark.parametrize(
    "change,fragment",
    [
        ({"n_people": 8, "val_fraction": 0.1}, "world_mmlu val"),
        ({"test_fraction": 0.0}, "world_mmlu val"),
        ({"val_fraction": 1.0}, "world_mmlu test"),
        ({"test_fraction": 1.0}, "train-split people"),
        ({"word_test": 0}, "word_test"),
        ({"sft_held_out": ["no_such_family"]}, "unknown families"),
        ({"sft_held_out": [f.name for f in FAMILIES]}, "sft train empty"),
        ({"mixture": Mixture(0, 0, 0, 0, 0)}, "mixture"),
        ({"n_countries": 3}, "4 choices"),
        ({"n_countries": 10}, "country without a city"),
        ({"max_digits": 1}, "arithmetic benchmark"),
        ({"arith_test": 2000}, "reserves too many"),
    ],
)
def test_sizes_that_empty_a_split_are_refused(tmp_path: Path, change: dict, fragment: str):
    with pytest.raises(UserError) as error:
        write_world(tmp_path / "w", preset=dataclasses.replace(TINY_WORLD, **change))
    assert_one_line(error, fragment)
    assert not (tmp_path / "w").exists()


def test_bad_preset_seed_noise_and_world_folder_are_user_errors(tmp_path: Path):
    with pytest.raises(UserError) as error:
        write_world(tmp_path / "w", preset="huge")
    assert_one_line(error, "'huge'", "quick, default, large")
    with pytest.raises(UserError) as error:
        write_world(tmp_path / "w", seed="7", preset=TINY_WORLD)
    assert_one_line(error, "seed")
    with pytest.raises(UserError) as error:
        Oracle(tmp_path)
    assert_one_line(error, "world.json", "gptlab world")
    (tmp_path / "world.json").mkdir()
    with pytest.raises(UserError) as error:
        Oracle(tmp_path)
    assert_one_line(error, "cannot be read")
    (tmp_path / "world.json").rmdir()
    (tmp_path / "world.json").write_text("{}")
    with pytest.raises(UserError) as error:
        Oracle(tmp_path)
    assert_one_line(error, "not a TinyWorld world file")
    with pytest.raises(UserError) as error:
        Oracle(tmp_path, noise=1.5)
    assert_one_line(error, "noise")


def test_presets_pass_their_own_checks():
    from gptlab.world.facts import JOBS
    from gptlab.world.presets import check_sizes

    assert list(PRESETS) == ["quick", "default", "large"]
    for size in PRESETS.values():
        check_sizes(size, [f.name for f in FAMILIES], len(JOBS))
    assert set(FAMILY_BY_NAME) >= set(PRESETS["default"].sft_held_out)
