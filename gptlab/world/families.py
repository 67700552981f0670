"""Instruction families: the kinds of request TinyWorld's chat data, preference data and oracle know.

A family is a set of prompt templates with slots, a way to fill the slots from the training or
the held-out side of the world, its reference answer and a correctness check. The same
definitions generate the SFT and preference data and, read backwards (templates compiled to
regular expressions), let the oracle recognise a prompt and know its true answer, so the oracle
judges any prompt of these forms, not only the ones written to disk.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass

from gptlab.world.arith import SYMBOLS, ArithSampler, Problem, Reservation
from gptlab.world.facts import ATTRIBUTES, BIO_ATTRIBUTES, Attribute, Person, World, article, biography, statement
from gptlab.world.words import TASK_BY_NAME, WordPools, WordTask, example

NAME = r"[A-Z][a-z]+ [A-Z][a-z]+"
LOWER = r"[a-z]+"
_YEAR = re.compile(r"\b\d{4}\b")
_ANSWER_NUMBER = re.compile(r"answer is (-?\d+)")
_ANSWER_WORD = re.compile(r"answer is ([A-Za-z]+)")


class Facts:
    """Lookups over one world, built once: people and cities by name, and finders that list
    which values of an attribute a text mentions."""

    def __init__(self, world: World):
        self.world = world
        self.person = {p.name: p for p in world.people}
        self.city = {c.name: c for c in world.cities}
        self._finders = {
            a.key: re.compile(
                r"\b(?:" + "|".join(re.escape(v) for v in sorted(world.values(a.key), key=len, reverse=True)) + r")\b"
            )
            for a in ATTRIBUTES
            if a.key != "birth_year"
        }

    def found(self, key: str, text: str) -> set[str]:
        """The values of attribute ``key`` that ``text`` mentions."""
        if key == "birth_year":
            return set(_YEAR.findall(text))
        return set(self._finders[key].findall(text))


@dataclass
class Sources:
    """Where families draw their slots from, per split ("train" for training data, "test" for
    held-out evaluation data). Held-out items are reserved before any training text exists."""

    facts: Facts
    arith: ArithSampler
    reservation: Reservation
    words: WordPools
    cities: dict[str, list[str]]
    people: dict[str, list[Person]]


class Family:
    """One kind of request. Subclasses define slots, gold answers and how to check a response."""

    name: str
    templates: tuple[str, ...]
    patterns: dict[str, str]  # slot -> regular expression the slot's text matches
    max_words = 25  # the style rule "concise" for this family

    def sample(self, sources: Sources, split: str, rng: random.Random) -> dict[str, str]:
        raise NotImplementedError

    def gold(self, facts: Facts, slots: dict[str, str]):
        """The true answer for these slots, or None if they name nothing in this world."""
        raise NotImplementedError

    def reference(self, facts: Facts, slots: dict[str, str]) -> str:
        raise NotImplementedError

    def correct(self, facts: Facts, slots: dict[str, str], response: str) -> bool:
        raise NotImplementedError

    def wrong(self, facts: Facts, slots: dict[str, str], rng: random.Random) -> str:
        """A well-formed answer in the reference's style that is false."""
        raise NotImplementedError

    def prompt(self, slots: dict[str, str], rng: random.Random) -> str:
        return rng.choice(self.templates).format(**slots)


class FactFamily(Family):
    """A question about one fact of one person; correct when the answer names the true value
    and no other value of that attribute."""

    def __init__(self, attribute: Attribute):
        self.attribute = attribute
        self.name = attribute.family
        self.templates = attribute.questions
        self.patterns = {"name": NAME}

    def sample(self, sources, split, rng):
        return {"name": rng.choice(sources.people[split]).name}

    def gold(self, facts, slots):
        person = facts.person.get(slots["name"])
        return None if person is None else str(getattr(person, self.attribute.key))

    def reference(self, facts, slots):
        return statement(self.attribute, facts.person[slots["name"]])

    def correct(self, facts, slots, response):
        return facts.found(self.attribute.key, response) == {self.gold(facts, slots)}

    def wrong(self, facts, slots, rng):
        person = facts.person[slots["name"]]
        gold = str(getattr(person, self.attribute.key))
        value = rng.choice([v for v in facts.world.values(self.attribute.key) if v != gold])
        return self.attribute.statement.format(name=person.name, value=value, a_value=article(value))


class CityCountryFamily(Family):
    name = "city_country"
    templates = (
        "In which country is {city}?",
        "Which country is {city} in?",
        "In which country does the city of {city} lie?",
    )
    patterns = {"city": r"[A-Z][a-z]+"}

    def sample(self, sources, split, rng):
        return {"city": rng.choice(sources.cities[split])}

    def gold(self, facts, slots):
        city = facts.city.get(slots["city"])
        return None if city is None else city.country

    def reference(self, facts, slots):
        return f"{slots['city']} is in {self.gold(facts, slots)}."

    def correct(self, facts, slots, response):
        return facts.found("birth_country", response) == {self.gold(facts, slots)}

    def wrong(self, facts, slots, rng):
        gold = self.gold(facts, slots)
        return f"{slots['city']} is in {rng.choice([c for c in facts.world.countries if c != gold])}."


class BiographyFamily(Family):
    """A short biography; correct when it states every fact of the person and no false one."""

    name = "biography"
    templates = ("Write a short biography of {name}.", "Tell me about {name}.")
    patterns = {"name": NAME}
    max_words = 80

    def sample(self, sources, split, rng):
        return {"name": rng.choice(sources.people[split]).name}

    def gold(self, facts, slots):
        return facts.person.get(slots["name"])

    def reference(self, facts, slots):
        return biography(facts.person[slots["name"]])

    def correct(self, facts, slots, response):
        person = facts.person[slots["name"]]
        if not facts.found("birth_country", response) <= {person.birth_country}:
            return False
        return all(facts.found(a.key, response) == {str(getattr(person, a.key))} for a in BIO_ATTRIBUTES)

    def wrong(self, facts, slots, rng):
        person = facts.person[slots["name"]]
        attribute = rng.choice(BIO_ATTRIBUTES)
        gold = str(getattr(person, attribute.key))
        value = rng.choice([v for v in facts.world.values(attribute.key) if v != gold])
        return biography(dataclasses.replace(person, **{attribute.key: type(getattr(person, attribute.key))(value)}))


def _extract_number(response: str) -> int | None:
    """ "The answer is N" if stated, else the last integer."""
    match = _ANSWER_NUMBER.search(response)
    numbers = [match.group(1)] if match else re.findall(r"-?\d+", response)
    return int(numbers[-1]) if numbers else None


class ArithFamily(Family):
    """A sum, difference or product; correct when the stated answer (or last number) is right."""

    def __init__(self, name: str, op: str, verb: str):
        self.name, self.op = name, op
        sym = SYMBOLS[op]
        self.templates = (f"What is {{a}}{sym}{{b}}?", f"Compute {{a}}{sym}{{b}}.", f"{{a}}{sym}{{b}}=?", verb)
        self.patterns = {"a": r"\d+", "b": r"\d+"}

    def sample(self, sources, split, rng):
        if split == "train":
            p = sources.arith.problem(self.op, steps=False)
        else:
            p = rng.choice(
                [q for task, qs in sources.reservation.heldout.items() if task.startswith(self.op + "_") for q in qs]
            )
        return {"a": str(p.a), "b": str(p.b)}

    def gold(self, facts, slots):
        return Problem(self.op, int(slots["a"]), int(slots["b"])).answer

    def reference(self, facts, slots):
        return f"The answer is {self.gold(facts, slots)}."

    def correct(self, facts, slots, response):
        return _extract_number(response) == self.gold(facts, slots)

    def wrong(self, facts, slots, rng):
        gold = self.gold(facts, slots)
        value = gold + rng.choice((-1, 1)) * rng.randint(1, 10) if gold > 10 else gold + rng.randint(1, 5)
        return f"The answer is {value}."


class WordFamily(Family):
    """A word task as an instruction; correct when the stated answer (or last word) is right."""

    def __init__(self, task: WordTask):
        self.task = task
        self.name = task.name
        self.templates = task.instructions
        # random_insertion's input is letters with a symbol between each two
        self.patterns = {"word": LOWER if task.transform else r"[a-z](?:[^\sa-z][a-z])+"}

    def sample(self, sources, split, rng):
        word = rng.choice(sources.words.train if split == "train" else sources.words.heldout)
        return {"word": example(self.task, word, rng)[0]}

    def gold(self, facts, slots):
        word = slots["word"]
        return self.task.transform(word) if self.task.transform else re.sub(r"[^a-z]", "", word)

    def reference(self, facts, slots):
        return f"The answer is {self.gold(facts, slots)}."

    def correct(self, facts, slots, response):
        match = _ANSWER_WORD.search(response)
        words = [match.group(1)] if match else re.findall(r"[A-Za-z]+", response)
        return bool(words) and words[-1] == self.gold(facts, slots)

    def wrong(self, facts, slots, rng):
        gold = self.gold(facts, slots)
        if self.task.transform is None:  # the word with two neighbouring letters swapped
            i = rng.randrange(len(gold) - 1)
            value = gold[:i] + gold[i + 1] + gold[i] + gold[i + 2 :]
            if value == gold:
                value = gold + gold[-1]
        else:  # what another task makes of the word: the confusion few-shot examples resolve
            others = [t.transform(slots["word"]) for t in TASK_BY_NAME.values() if t.transform and t is not self.task]
            value = rng.choice([o for o in others if o != gold] or [gold[::-1] + "a"])
        return f"The answer is {value}."


FAMILIES: tuple[Family, ...] = (
    *(FactFamily(a) for a in ATTRIBUTES),
    CityCountryFamily(),
    BiographyFamily(),
    ArithFamily("add", "add", "Add {a} and {b}."),
    ArithFamily("subtract", "sub", "Subtract {b} from {a}."),
    ArithFamily("multiply", "mul", "Multiply {a} by {b}."),
    *(WordFamily(t) for t in TASK_BY_NAME.values()),
)
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}


def template_regex(template: str, patterns: dict[str, str]) -> re.Pattern[str]:
    """A template's literal text, escaped, with each {slot} as a named group."""
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>{patterns[part]})" for i, part in enumerate(parts))
    return re.compile(regex)
