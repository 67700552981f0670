"""The invented world (people, cities, countries, companies, universities) and the text about it:
biographies, question-answer documents, world_mmlu questions and plain prose.

Facts live in ``World``, which round-trips through ``world.json`` so the oracle can judge answers
from the file alone. Biographies state every person's facts in several paraphrases with varied
sentence order, because a fact stated in one fixed form is memorised but cannot be extracted by a
question about a held-out person (Allen-Zhu & Li, "Physics of Language Models 3.1").
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from gptlab.errors import UserError
from gptlab.world.names import NameMaker
from gptlab.world.presets import WorldSize

WORLD_FORMAT = "tinyworld/1"
YEARS = (1900, 1999)  # birth years are drawn from this range, inclusive

JOBS = (
    "architect",
    "astronomer",
    "baker",
    "banker",
    "brewer",
    "butcher",
    "carpenter",
    "chemist",
    "clerk",
    "cook",
    "dentist",
    "doctor",
    "engineer",
    "farmer",
    "fisher",
    "gardener",
    "jeweler",
    "lawyer",
    "librarian",
    "mason",
    "miner",
    "musician",
    "nurse",
    "painter",
    "pilot",
    "potter",
    "sailor",
    "shepherd",
    "tailor",
    "teacher",
    "translator",
    "weaver",
    "writer",
    "glazier",
    "optician",
    "surveyor",
)
FEATURES = (
    "on a wide river",
    "by the sea",
    "in the hills",
    "beside a deep lake",
    "at the edge of a forest",
    "on a windy plain",
    "in a green valley",
    "under high mountains",
    "on a rocky island",
    "near the marshes",
)
PRODUCTS = (
    "apples",
    "wool",
    "glass",
    "bread",
    "salt",
    "copper",
    "tea",
    "silk",
    "cheese",
    "paper",
    "rope",
    "boats",
    "clocks",
    "lamps",
    "honey",
    "pottery",
    "carpets",
    "violins",
    "maps",
    "candles",
    "soap",
    "barrels",
    "bells",
    "hats",
)
FIELDS = (
    "mathematics",
    "medicine",
    "music",
    "law",
    "astronomy",
    "history",
    "chemistry",
    "poetry",
    "engineering",
    "botany",
    "painting",
    "philosophy",
)
COMPANY_KINDS = (
    "Works",
    "Mills",
    "Foundry",
    "Traders",
    "Shipping",
    "Press",
    "Textiles",
    "Brewery",
    "Glassworks",
    "Company",
)
UNIVERSITY_KINDS = ("University", "College", "Institute", "Academy")


# ----------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class City:
    name: str
    country: str
    feature: str  # where it lies: "on a wide river"
    product: str  # what it is known for


@dataclass(frozen=True)
class Company:
    name: str
    city: str
    product: str


@dataclass(frozen=True)
class University:
    name: str
    city: str
    field: str


@dataclass(frozen=True)
class Person:
    name: str  # "First Last", unique
    pronoun: str  # "he" or "she"
    birth_city: str
    birth_country: str
    birth_year: int
    university: str
    job: str
    employer: str
    split: str  # "train": questions about them may be trained on; "test": only in benchmarks
    bench: str | None  # for test-split people: which world_mmlu split asks about them, "val" or "test"


@dataclass(frozen=True)
class World:
    countries: list[str]
    cities: list[City]
    companies: list[Company]
    universities: list[University]
    jobs: list[str]
    people: list[Person]

    def people_in(self, split: str) -> list[Person]:
        return [p for p in self.people if p.split == split]

    def values(self, attribute: str) -> list[str]:
        """Every value an attribute can take, as strings, in a fixed order (the answer pool)."""
        pools = {
            "birth_city": [c.name for c in self.cities],
            "birth_country": list(self.countries),
            "birth_year": [str(y) for y in range(YEARS[0], YEARS[1] + 1)],
            "university": [u.name for u in self.universities],
            "job": list(self.jobs),
            "employer": [c.name for c in self.companies],
        }
        return pools[attribute]

    def to_json(self) -> dict:
        return {
            "countries": self.countries,
            "cities": [asdict(c) for c in self.cities],
            "companies": [asdict(c) for c in self.companies],
            "universities": [asdict(u) for u in self.universities],
            "jobs": self.jobs,
            "people": [asdict(p) for p in self.people],
        }

    @classmethod
    def load(cls, world_dir: str | Path) -> World:
        """Read ``world.json`` from a folder written by ``write_world``."""
        path = Path(world_dir) / "world.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != WORLD_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            return cls(
                countries=list(data["countries"]),
                cities=[City(**c) for c in data["cities"]],
                companies=[Company(**c) for c in data["companies"]],
                universities=[University(**u) for u in data["universities"]],
                jobs=list(data["jobs"]),
                people=[Person(**p) for p in data["people"]],
            )
        except FileNotFoundError:
            raise UserError(f"{path} does not exist: give a folder written by `gptlab world`") from None
        except OSError as e:
            raise UserError(f"{path} cannot be read ({e.strerror}): check the path and its permissions") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{path} is not a TinyWorld world file ({e}): regenerate it with `gptlab world`") from None


def build_world(size: WorldSize, rng: random.Random) -> World:
    """Invent the world: names first (all unique across kinds), then facts, then the people split."""
    names = NameMaker(rng)

    def proper(syllables: tuple[int, int], endings: tuple[str, ...] = ("",), longest: int = 9) -> str:
        return names.make(syllables, endings, length=(4, longest)).capitalize()

    countries = [
        proper((2, 2), ("ia", "ania", "land", "or", "ea", "mark"), longest=10) for _ in range(size.n_countries)
    ]
    cities = []
    for i in range(size.n_cities):
        country = countries[i % len(countries)] if i < len(countries) else rng.choice(countries)
        cities.append(
            City(
                proper((2, 3), ("", "", "ton", "ford", "holm", "grad", "wick"), longest=10),
                country,
                rng.choice(FEATURES),
                rng.choice(PRODUCTS),
            )
        )
    companies = [
        Company(f"{proper((2, 2))} {rng.choice(COMPANY_KINDS)}", rng.choice(cities).name, rng.choice(PRODUCTS))
        for _ in range(size.n_companies)
    ]
    universities = [
        University(f"{proper((2, 2))} {rng.choice(UNIVERSITY_KINDS)}", rng.choice(cities).name, rng.choice(FIELDS))
        for _ in range(size.n_universities)
    ]
    jobs = sorted(rng.sample(JOBS, size.n_jobs))

    first_names = [proper((2, 2), longest=7) for _ in range(max(40, size.n_people // 4))]
    last_names = [
        proper((2, 3), ("", "", "", "son", "ek", "ova", "in", "ar")) for _ in range(max(80, size.n_people // 2))
    ]
    full: list[str] = []
    seen: set[str] = set()
    while len(full) < size.n_people:
        name = f"{rng.choice(first_names)} {rng.choice(last_names)}"
        if name not in seen:
            seen.add(name)
            full.append(name)

    order = list(range(size.n_people))
    rng.shuffle(order)
    split_of = {}
    for rank, i in enumerate(order):
        if rank < size.n_val_people:
            split_of[i] = ("test", "val")
        elif rank < size.n_test_people:
            split_of[i] = ("test", "test")
        else:
            split_of[i] = ("train", None)
    people = []
    for i, name in enumerate(full):
        city = rng.choice(cities)
        people.append(
            Person(
                name=name,
                pronoun=rng.choice(("he", "she")),
                birth_city=city.name,
                birth_country=city.country,
                birth_year=rng.randint(*YEARS),
                university=rng.choice(universities).name,
                job=rng.choice(jobs),
                employer=rng.choice(companies).name,
                split=split_of[i][0],
                bench=split_of[i][1],
            )
        )
    return World(countries, cities, companies, universities, jobs, people)


# ----------------------------------------------------------------------------- attributes


@dataclass(frozen=True)
class Attribute:
    """One fact about a person: how it is asked (questions), stated (statement) and told (bio)."""

    key: str  # Person field
    subject: str  # world_mmlu subject, the CSV file stem
    family: str  # the instruction family asking it
    questions: tuple[str, ...]  # with {name}
    statement: str  # the reference answer, with {name} and {value} (or {a_value}: "a baker")
    bio: tuple[str, ...]  # biography sentences with {S} subject, {P} possessive, {value}, {country}


ATTRIBUTES = (
    Attribute(
        "birth_city",
        "birthplaces",
        "person_city",
        ("Where was {name} born?", "In which city was {name} born?", "What is the birthplace of {name}?"),
        "{name} was born in {value}.",
        (
            "{S} was born in {value}.",
            "{S} was born in the city of {value}.",
            "{P} birthplace is {value}.",
            "{S} was born in {value}, a city in {country}.",
            "{S} comes from {value}.",
        ),
    ),
    Attribute(
        "birth_year",
        "birth_years",
        "person_year",
        ("In which year was {name} born?", "When was {name} born?", "What is the birth year of {name}?"),
        "{name} was born in {value}.",
        (
            "{S} was born in {value}.",
            "{S} was born in the year {value}.",
            "{P} year of birth is {value}.",
            "{S} came into the world in {value}.",
        ),
    ),
    Attribute(
        "university",
        "universities",
        "person_university",
        ("Where did {name} study?", "Which university did {name} attend?", "At which university did {name} study?"),
        "{name} studied at {value}.",
        (
            "{S} studied at {value}.",
            "{S} graduated from {value}.",
            "{S} attended {value}.",
            "{P} alma mater is {value}.",
        ),
    ),
    Attribute(
        "job",
        "occupations",
        "person_job",
        ("What is the job of {name}?", "What does {name} do for a living?", "What is the occupation of {name}?"),
        "{name} works as {a_value}.",
        (
            "{S} works as {a_value}.",
            "{S} is {a_value} by profession.",
            "{S} earns a living as {a_value}.",
            "{P} occupation is {value}.",
        ),
    ),
    Attribute(
        "employer",
        "employers",
        "person_employer",
        ("Who employs {name}?", "Which company does {name} work for?", "Where does {name} work?"),
        "{name} works for {value}.",
        (
            "{S} works for {value}.",
            "{S} is employed by {value}.",
            "{S} has a job at {value}.",
            "{P} employer is {value}.",
        ),
    ),
    Attribute(
        "birth_country",
        "home_countries",
        "person_country",
        (
            "In which country was {name} born?",
            "What is the home country of {name}?",
            "Which country does {name} come from?",
        ),
        "{name} was born in {value}.",
        (),  # learnt from "born in X, a city in Y" and from the prose about cities (a two-hop fact)
    ),
)
BIO_ATTRIBUTES = tuple(a for a in ATTRIBUTES if a.bio)


def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def statement(attribute: Attribute, person: Person) -> str:
    """The reference sentence stating one fact, e.g. "Balo Tirin was born in Vellor."."""
    value = str(getattr(person, attribute.key))
    return attribute.statement.format(name=person.name, value=value, a_value=article(value))


def biography(person: Person, rng: random.Random | None = None) -> str:
    """One paraphrase of a person's biography; ``rng=None`` gives the canonical one (first
    templates, fixed order), which the oracle uses as the reference answer."""
    first = person.name.split()[0]
    pronoun = person.pronoun.capitalize()
    possessive = "His" if person.pronoun == "he" else "Her"
    attributes = list(BIO_ATTRIBUTES)
    if rng is not None:
        rng.shuffle(attributes)
    sentences = []
    for i, attribute in enumerate(attributes):
        template = attribute.bio[0] if rng is None else rng.choice(attribute.bio)
        if i == 0:
            subject = person.name
        elif rng is None:
            subject = pronoun
        else:
            subject = rng.choice((person.name, first, pronoun))
        owner = possessive if subject == pronoun else subject + "'s"
        value = str(getattr(person, attribute.key))
        sentences.append(
            template.format(S=subject, P=owner, value=value, a_value=article(value), country=person.birth_country)
        )
    return " ".join(sentences)


def biographies(world: World, per_person: int, rng: random.Random) -> list[str]:
    """``per_person`` distinct paraphrases of every person's biography, in shuffled order."""
    docs = []
    for person in world.people:
        mine: list[str] = []
        for _ in range(per_person * 20):
            if len(mine) == per_person:
                break
            bio = biography(person, rng)
            if bio not in mine:
                mine.append(bio)
        docs += mine
    rng.shuffle(docs)
    return docs


# ----------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Question:
    """A 4-choice question in MMLU's layout."""

    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"

    def row(self) -> list[str]:
        return [self.question, *self.choices, self.answer]

    def prompt(self) -> str:
        """As lm-evaluation-harness shows an MMLU question, with its answer."""
        lines = [self.question.strip()] + [f"{letter}. {c}" for letter, c in zip("ABCD", self.choices)]
        return "\n".join(lines) + f"\nAnswer: {self.answer}"


def mmlu_header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def question(world: World, attribute: Attribute, person: Person, rng: random.Random) -> Question:
    """A 4-choice question on one fact: the true value and three others from the same pool
    (years within ten of the true one, so that "about right" is not enough)."""
    gold = str(getattr(person, attribute.key))
    if attribute.key == "birth_year":
        pool = [str(y) for y in range(int(gold) - 10, int(gold) + 11) if str(y) != gold]
    else:
        pool = [v for v in world.values(attribute.key) if v != gold]
    choices = [gold] + rng.sample(pool, 3)
    rng.shuffle(choices)
    text = rng.choice(attribute.questions).format(name=person.name)
    return Question(attribute.subject, text, tuple(choices), "ABCD"[choices.index(gold)])


def mmlu_sets(world: World, rng: random.Random) -> dict[str, dict[str, list[Question]]]:
    """world_mmlu: split -> subject -> questions. dev holds 5 questions per subject about
    train-split people (few-shot exemplars), shortest first: lm-eval takes the first k of dev as the
    k shots, so k-shot prompts are as short as the dev split allows (docs/scaling.md, "world_mmlu
    and the window"). val and test ask about the two disjoint groups of test-split people, one
    question per person and subject."""
    train = world.people_in("train")
    sets: dict[str, dict[str, list[Question]]] = {"dev": {}, "val": {}, "test": {}}
    for attribute in ATTRIBUTES:
        dev = [question(world, attribute, p, rng) for p in rng.sample(train, 5)]
        sets["dev"][attribute.subject] = sorted(dev, key=lambda q: len(q.prompt()))
        for split in ("val", "test"):
            sets[split][attribute.subject] = [
                question(world, attribute, p, rng) for p in world.people if p.bench == split
            ]
    return sets


def qa_documents(world: World, budget: int, mc_fraction: float, rng: random.Random) -> list[str]:
    """About ``budget`` characters of questions and answers about train-split people only:
    "Q: ... A: value." lines about one person, or MMLU-style multiple-choice blocks (which teach
    the "Answer: B" format the benchmark uses). MMLU blocks hold blank lines, so these documents
    go to a .jsonl file."""
    train = world.people_in("train")
    docs: list[str] = []
    size = 0
    while size < budget:
        if rng.random() < mc_fraction:
            attribute = rng.choice(ATTRIBUTES)
            block = [question(world, attribute, p, rng).prompt() for p in rng.sample(train, rng.randint(1, 4))]
            doc = mmlu_header(attribute.subject) + "\n\n".join(block)
        else:
            person = rng.choice(train)
            attributes = rng.sample(ATTRIBUTES, rng.randint(2, len(ATTRIBUTES)))
            doc = "\n".join(
                f"Q: {rng.choice(a.questions).format(name=person.name)} A: {getattr(person, a.key)}."
                for a in attributes
            )
        docs.append(doc)
        size += len(doc) + 1
    return docs


# ----------------------------------------------------------------------------- prose

SEASONS = ("spring", "summer", "autumn", "winter")
WEATHER = (
    "it rained all day",
    "the wind blew from the north",
    "the sun shone",
    "a thick fog came in",
    "snow fell on the roofs",
    "the air was warm and still",
)
STORIES = (
    (
        "One {season} morning, {a_job} from {city} walked to the market to buy {product}. "
        "The streets were busy, and {weather_clause}. By noon the market had sold out of {product}."
    ),
    (
        "In {city}, the {job}s meet every {season} to share news. "
        "This year they talked about {product} and about the roads to {city2}."
    ),
    (
        "The road from {city} to {city2} is long. "
        "Travellers carry {product} and stop to rest at small inns, where {a_job} often tells stories."
    ),
    (
        "Last {season}, {a_job} in {city} opened a new shop. "
        "The shop sold {product}, and people came from {city2} to see it."
    ),
    "Children in {country} learn that {city} lies {feature}. Many of them visit it in {season} with their teachers.",
    "When {weather_clause}, the people of {city} stay inside and drink tea. Others go out to buy {product}.",
    "{a_job_cap} from {city2} once said that nobody in {country} makes better {product} than the people of {city}.",
)


def prose_documents(world: World, budget: int, rng: random.Random) -> list[str]:
    """About ``budget`` characters of plain prose about places and companies. It restates the
    world's geography (which city lies in which country, which is what makes the two-hop
    "home country" questions answerable) and gives the model ordinary language to learn. It
    names no person, so people's facts live only in biographies and train-split QA."""
    docs: list[str] = []
    size = 0
    while size < budget:
        kind = rng.random()
        if kind < 0.3:
            city = rng.choice(world.cities)
            doc = (
                f"{city.name} is a city in {city.country}. It lies {city.feature}. "
                f"{city.name} is known for its {city.product}. "
                f"In {rng.choice(SEASONS)}, {rng.choice(WEATHER)} in {city.name}."
            )
        elif kind < 0.4:
            country = rng.choice(world.countries)
            mine = [c.name for c in world.cities if c.country == country]
            listed = rng.sample(mine, min(len(mine), 3))
            joined = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
            doc = (
                f"{country} is a country. Its cities include {joined}. "
                f"Many people in {country} work as {rng.choice(world.jobs)}s."
            )
        elif kind < 0.55:
            company = rng.choice(world.companies)
            doc = (
                f"{company.name} is a company based in {company.city}. It makes {company.product}, "
                f"and its workers sell them in {rng.choice(world.cities).name}."
            )
        elif kind < 0.65:
            uni = rng.choice(world.universities)
            city = next(c for c in world.cities if c.name == uni.city)
            doc = f"{uni.name} is a university in {uni.city}, {city.country}. It is known for {uni.field}."
        else:
            city, city2 = rng.sample(world.cities, 2)
            job = rng.choice(world.jobs)
            doc = rng.choice(STORIES).format(
                season=rng.choice(SEASONS),
                city=city.name,
                city2=city2.name,
                country=city.country,
                feature=city.feature,
                product=rng.choice(PRODUCTS),
                job=job,
                a_job=article(job),
                a_job_cap=article(job).capitalize(),
                weather_clause=rng.choice(WEATHER),
            )
        docs.append(doc)
        size += len(doc) + 2
    return docs
