"""Procedural synthetic knowledge bases: fictional entities with Faker-made facts (no LLM API).

``synthetic_triples(n)`` makes ``n`` fictional entities of mixed types (companies, people,
cities, books, films, products, universities, ships, bands) and gives each one value for
*every* property of its type, so a ``(name, property)`` pair occurs once. Everything is drawn
from one ``Faker("en_US")`` instance seeded with ``seed_instance(seed)`` and one
``random.Random(seed)``: the same seed gives the same list, and no global random state is
touched. Word pools come from Faker's en_US providers plus short lists below; sampling them
with ``random.Random`` keeps 100,000 entities to a few seconds.

Train/test separation is by entity *name*: ``split_of(name)`` hashes the name (SHA-1) and puts
10% of all possible names in "test". ``synthetic_triples(..., split="test")`` keeps drawing
names until enough fall in that split, so a train KB and a test KB can never share an entity,
whatever seeds made them.

Every property belongs to a *family* ("year", "person", "place", "code", "number", "phrase",
"date", "organisation"); ``kb_builders.questions`` words its questions per family.
"""

from __future__ import annotations

import bisect
import calendar
import hashlib
import itertools
import math
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from faker.providers.address.en_US import Provider as _AddressProvider
from faker.providers.job.en_US import Provider as _JobProvider
from faker.providers.person.en_US import Provider as _PersonProvider

from kblam.kb import KnowledgeBase, Triple

if TYPE_CHECKING:
    from faker import Faker

__all__ = [
    "ENTITY_TYPES",
    "FAMILIES",
    "SPLITS",
    "EntityType",
    "PropertySpec",
    "property_family",
    "random_entity_name",
    "split_of",
    "synthetic_kb",
    "synthetic_triples",
]

FAMILIES = ("year", "person", "place", "code", "number", "phrase", "date", "organisation")
SPLITS = ("train", "test")
TEST_PERCENT = 10

ValueGenerator = Callable[["Faker", random.Random], str]
NameGenerator = Callable[[random.Random], str]
Disambiguator = Callable[[str, random.Random], str]


# --------------------------------------------------------------------------- split

def split_of(name: str) -> str:
    """"test" for 10% of names, "train" for the rest, by a stable hash (SHA-1) of the exact name.

    Independent of seeds, processes and PYTHONHASHSEED, so KBs made for different splits can
    never share an entity name.
    """
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


# --------------------------------------------------------------------------- word pools

def _flattened(weighted: dict[str, float]) -> tuple[tuple[str, ...], list[float]]:
    # Faker's name weights are real US frequencies; their square root keeps common names common
    # without making "James Smith" a third of all people (more distinct names, fewer collisions).
    names = tuple(weighted)
    return names, list(itertools.accumulate(math.sqrt(w) for w in weighted.values()))


_FIRST, _FIRST_CUM = _flattened(_PersonProvider.first_names)
_LAST, _LAST_CUM = _flattened(_PersonProvider.last_names)
_FIRST_TOTAL, _LAST_TOTAL = _FIRST_CUM[-1], _LAST_CUM[-1]
_STATES = tuple(_AddressProvider.states)
_CITY_PREFIXES = tuple(_AddressProvider.city_prefixes) + ("Mount", "Fort", "Glen", "Upper", "Little", "Old")
_CITY_SUFFIXES = tuple(_AddressProvider.city_suffixes) + ("field", "ford", "dale", "wood", "brook", "stead")
_UPPER = string.ascii_uppercase
_CODE_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"  # no I/O/Q: they read as digits
# Faker's job titles, kept when short and free of commas/brackets ("Engineer, civil (contracting)").
_OCCUPATIONS = tuple(
    (j[0].lower() + j[1:]) if j[1:2].islower() else j
    for j in _JobProvider.jobs
    if "," not in j and "(" not in j and "/" not in j and len(j.split()) <= 4
)
_MONTHS = tuple(calendar.month_name[1:])
_ROMAN = ("II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII", "XIII", "XIV", "XV")

_TITLE_ADJ = (
    "Silent", "Broken", "Golden", "Hidden", "Last", "Crimson", "Distant", "Quiet", "Burning", "Frozen",
    "Wandering", "Secret", "Lost", "Northern", "Bitter", "Painted", "Hollow", "Endless", "Midnight", "Iron",
    "Glass", "Paper", "Velvet", "Salt", "Copper", "Amber", "Restless", "Sleeping", "Forgotten", "Emerald",
    "Scarlet", "Falling", "Rising", "Wild", "Gentle", "Shattered", "Drowned", "Electric", "Fading", "Southern",
    "Borrowed", "Invisible", "Lonely", "Savage", "Crooked", "Shining", "Stolen", "Winter", "Summer", "Seventh",
)
_TITLE_NOUN = (
    "Harbor", "Garden", "River", "Winter", "Lantern", "Orchard", "Mirror", "Kingdom", "Voyage", "Tide",
    "Compass", "Letter", "Window", "Signal", "Bridge", "Forest", "Crown", "Shadow", "Island", "Machine",
    "Summer", "Mountain", "Station", "Archive", "Lighthouse", "Meadow", "Cathedral", "Empire", "Frontier",
    "Horizon", "Labyrinth", "Orbit", "Parade", "Quarry", "Refuge", "Sanctuary", "Tower", "Valley", "Wilderness",
    "Cartographer", "Daughter", "Stranger", "Widow", "Inheritance", "Promise", "Silence", "Storm", "Fire",
    "Ocean", "Desert", "Engine", "Clockmaker", "Gardener", "Alchemist", "Pilgrim", "Ember", "Citadel", "Echo",
)
_TITLE_TIME = ("Winter", "Spring", "Summer", "Autumn", "the Rain", "the Dark", "Exile", "Paradise",
               "the North", "the Morning", "the Evening", "the Snow") + _MONTHS
_PLURAL_NOUN = (
    "Foxes", "Owls", "Lanterns", "Ravens", "Wolves", "Machines", "Strangers", "Sparrows", "Rivers", "Pilots",
    "Ghosts", "Comets", "Tigers", "Dreamers", "Anchors", "Satellites", "Horses", "Kings", "Shadows", "Engines",
    "Monks", "Sailors", "Giants", "Bells", "Mirrors", "Flowers", "Rockets", "Thieves", "Echoes", "Wanderers",
    "Lions", "Saints", "Arrows", "Magnets", "Orchids", "Pirates", "Drifters", "Cousins", "Hounds", "Wires",
)
_BAND_SINGULAR = ("Collective", "Orchestra", "Quartet", "Trio", "Project", "Ensemble", "Sound", "Society")
_BRAND_START = ("Vel", "Zen", "Nov", "Aur", "Kor", "Lum", "Tav", "Quin", "Sol", "Bri", "Mar", "Cel", "Dax",
                "Ori", "Pyr", "Hal", "Ner", "Vis", "Tel", "Ark", "Bel", "Cor", "Fen", "Gal", "Jun", "Lyr")
_BRAND_END = ("ora", "trix", "alo", "ex", "ion", "ara", "ento", "iq", "ova", "yn", "ita", "on", "ux", "ica",
              "ano", "wave", "tek", "ium", "is", "ent")
_PRODUCT_LINES = ("Aero", "Pulse", "Nova", "Vista", "Echo", "Terra", "Flux", "Orbit", "Prism", "Summit",
                  "Core", "Edge", "Wave", "Spark", "Zephyr", "Atlas", "Nimbus", "Quartz", "Ember", "Glide",
                  "Halo", "Vector", "Onyx", "Drift", "Comet")
_PRODUCT_TIERS = ("Pro", "Max", "Mini", "Plus", "Lite", "SE", "Ultra", "Air")
_PRODUCT_CATEGORIES = (
    "cordless vacuum", "espresso machine", "smartwatch", "electric kettle", "noise-cancelling headphones",
    "robot lawnmower", "tablet computer", "air purifier", "digital camera", "gaming console", "e-reader",
    "electric toothbrush", "smart speaker", "stand mixer", "portable projector", "fitness tracker",
    "electric scooter", "mechanical keyboard", "rice cooker", "drone", "wireless earbuds", "hair dryer",
    "space heater", "laptop", "blender", "dishwasher", "microwave oven", "sewing machine",
)
_COMPANY_SUFFIXES = ("Inc", "LLC", "Group", "Ltd", "PLC", "and Sons", "Holdings", "Industries", "Partners",
                     "Labs", "Systems", "Logistics", "Foods", "Capital", "Works", "Technologies", "Energy",
                     "Analytics", "Textiles", "Robotics", "Media", "Motors", "Dynamics", "Consulting")
_COMPANY_EXTRAS = ("International", "Worldwide", "North America", "Holdings", "Global", "Enterprises")
_INDUSTRIES = (
    "renewable energy", "marine logistics", "consumer electronics", "organic food", "software consulting",
    "biotechnology", "commercial aviation", "textile manufacturing", "real estate", "video games",
    "pharmaceuticals", "insurance", "freight rail", "cosmetics", "medical devices", "agricultural machinery",
    "cloud hosting", "craft brewing", "furniture design", "telecommunications", "sports equipment",
    "waste management", "children's toys", "luxury watches", "industrial robotics", "film distribution",
    "water treatment", "solar panels", "pet food", "outdoor clothing", "mining equipment", "specialty coffee",
    "cybersecurity", "hotel management", "semiconductors", "data analytics", "dairy farming",
    "battery storage", "market research", "precision optics",
)
_COLOURS = (
    "red", "blue", "green", "gold", "silver", "black", "white", "navy", "crimson", "teal", "orange",
    "purple", "maroon", "ivory", "charcoal", "olive", "turquoise", "amber", "scarlet", "emerald", "cobalt",
    "lavender", "bronze", "copper", "burgundy", "slate grey", "forest green", "sky blue", "royal blue",
    "pale yellow", "dark green", "cream", "coral", "magenta", "indigo", "mustard", "rose pink", "sand", "plum",
)
_FINISHES = ("matte", "glossy", "brushed", "pearl", "metallic", "frosted")
_BOOK_GENRES = (
    "historical fiction", "science fiction", "mystery", "literary fiction", "fantasy", "crime thriller",
    "romance", "horror", "memoir", "travel writing", "poetry", "young adult fiction", "gothic fiction",
    "satire", "adventure", "political thriller", "short stories", "magical realism", "detective fiction",
    "coming-of-age fiction", "popular science", "biography",
)
_FILM_GENRES = (
    "drama", "comedy", "action thriller", "documentary", "animated adventure", "romantic comedy",
    "science fiction", "horror", "war drama", "musical", "western", "crime drama", "psychological thriller",
    "family comedy", "biopic", "disaster film", "heist film", "sports drama", "fantasy epic", "mystery",
)
_MUSIC_GENRES = (
    "indie rock", "jazz fusion", "folk", "synth-pop", "blues rock", "bluegrass", "heavy metal", "soul",
    "punk rock", "electronic dance", "country", "hip hop", "dream pop", "post-rock", "reggae", "gospel",
    "psychedelic rock", "funk", "ska", "chamber pop", "shoegaze", "Americana",
)
_NICKNAME_ADJ = ("Windy", "Silver", "Emerald", "Iron", "Golden", "Rose", "River", "Garden", "Lantern",
                 "Harbor", "Maple", "Copper", "Granite", "Sunset", "Pine", "Bridge", "Lakeside", "Steel",
                 "Orchard", "Prairie", "Canal", "Thunder", "Mill", "Railroad")
_NICKNAME_NOUN = ("City", "Town", "Capital", "Gate", "Valley", "Port", "Crossing", "Jewel", "Village")
_VIRTUES = ("Truth", "Light", "Knowledge", "Service", "Honour", "Wisdom", "Courage", "Faith", "Progress",
            "Learning", "Virtue", "Labour", "Liberty", "Unity", "Discovery", "Integrity", "Excellence",
            "Curiosity", "Reason", "Freedom")
_MASCOT_ADJ = ("golden", "grey", "red", "fighting", "mighty", "blue", "silver", "running", "flying", "black",
               "white", "green", "roaring", "howling", "swift")
_ANIMALS = ("otter", "falcon", "bear", "wolf", "heron", "fox", "badger", "eagle", "lion", "stag", "owl",
            "hawk", "bison", "panther", "raven", "tiger", "beaver", "lynx", "osprey", "moose", "coyote")
_SHIP_PREFIXES = ("SS", "MV", "RV", "MS")


# --------------------------------------------------------------------------- small generators

def _first(rng: random.Random) -> str:
    return _FIRST[bisect.bisect(_FIRST_CUM, rng.random() * _FIRST_TOTAL)]


def _last(rng: random.Random) -> str:
    return _LAST[bisect.bisect(_LAST_CUM, rng.random() * _LAST_TOTAL)]


def _person(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return f"{_first(rng)} {rng.choice(_UPPER)}. {_last(rng)}"
    return f"{_first(rng)} {_last(rng)}"


def _city(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.35:
        return f"{rng.choice(_CITY_PREFIXES)} {_first(rng)}{rng.choice(_CITY_SUFFIXES)}"
    if r < 0.5:
        return f"{rng.choice(_CITY_PREFIXES)} {_first(rng)}"
    if r < 0.75:
        return f"{_first(rng)}{rng.choice(_CITY_SUFFIXES)}"
    return f"{_last(rng)}{rng.choice(_CITY_SUFFIXES)}"


def _brand(rng: random.Random) -> str:
    return rng.choice(_BRAND_START) + rng.choice(_BRAND_END)


def _company(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.45:
        return f"{_last(rng)} {rng.choice(_COMPANY_SUFFIXES)}"
    if r < 0.6:
        return f"{_last(rng)}-{_last(rng)}"
    if r < 0.7:
        return f"{_last(rng)}, {_last(rng)} and {_last(rng)}"
    return f"{_brand(rng)} {rng.choice(_COMPANY_SUFFIXES)}"


def _a(word: str) -> str:
    """"An Echo", "A Garden": the article, capitalised, for a title."""
    return f"An {word}" if word[0] in "AEIOU" else f"A {word}"


def _title(rng: random.Random) -> str:
    """A book, film or album title."""
    r = rng.random()
    adj, noun = rng.choice(_TITLE_ADJ), rng.choice(_TITLE_NOUN)
    if r < 0.14:
        return f"The {adj} {noun}"
    if r < 0.2:
        return f"{adj} {noun}"
    if r < 0.27:
        return f"{noun} and {rng.choice(_TITLE_NOUN)}"
    if r < 0.35:
        return f"{_a(noun)} in {rng.choice(_TITLE_TIME)}"
    if r < 0.45:
        return f"The {noun} of {_city(rng)}"
    if r < 0.55:
        return f"{_first(rng)}'s {noun}"
    if r < 0.62:
        return f"Beyond the {adj} {noun}"
    if r < 0.68:
        return f"Letters from {_city(rng)}"
    if r < 0.74:
        return f"The Last {noun} of {rng.choice(_TITLE_TIME)}"
    if r < 0.82:
        return f"The {adj} {noun} of {_city(rng)}"
    if r < 0.9:
        return f"{_first(rng)} and the {adj} {noun}"
    if r < 0.95:
        return f"{rng.choice(('Under', 'After', 'Before', 'Across'))} the {adj} {noun}"
    return f"The {_last(rng)} {noun}"


def _org(suffixes: Sequence[str]) -> ValueGenerator:
    def generate(fake: Faker, rng: random.Random) -> str:
        r = rng.random()
        if r < 0.5:
            return f"{_last(rng)} {rng.choice(suffixes)}"
        if r < 0.8:
            return f"{_brand(rng)} {rng.choice(suffixes)}"
        return f"{_last(rng)} and {_last(rng)} {rng.choice(suffixes)}"

    return generate


def _year(lo: int, hi: int) -> ValueGenerator:
    return lambda fake, rng: str(rng.randint(lo, hi))


def _date(lo: int, hi: int) -> ValueGenerator:
    def generate(fake: Faker, rng: random.Random) -> str:
        year, month = rng.randint(lo, hi), rng.randint(1, 12)
        day = rng.randint(1, calendar.monthrange(year, month)[1])
        return f"{_MONTHS[month - 1]} {day}, {year}"

    return generate


def _count(lo: float, hi: float, unit: str = "", prefix: str = "") -> ValueGenerator:
    """A log-uniform integer in [lo, hi], written with thousands separators ("4,210")."""
    log_lo, log_hi = math.log10(lo), math.log10(hi)

    def generate(fake: Faker, rng: random.Random) -> str:
        return f"{prefix}{round(10 ** rng.uniform(log_lo, log_hi)):,}{unit}"

    return generate


def _choice(pool: Sequence[str]) -> ValueGenerator:
    return lambda fake, rng: rng.choice(pool)


def _person_value(fake: Faker, rng: random.Random) -> str:
    return _person(rng)


def _city_value(fake: Faker, rng: random.Random) -> str:
    return _city(rng)


def _title_value(fake: Faker, rng: random.Random) -> str:
    return _title(rng)


def _ticker(fake: Faker, rng: random.Random) -> str:
    return "".join(rng.choice(_UPPER) for _ in range(rng.randint(3, 4)))


def _passport(fake: Faker, rng: random.Random) -> str:
    return fake.bothify("?########", letters=_CODE_LETTERS)


def _model_number(fake: Faker, rng: random.Random) -> str:
    return fake.bothify(rng.choice(("??-####", "??-###", "???-##", "?#-####")), letters=_CODE_LETTERS)


def _postal_code(fake: Faker, rng: random.Random) -> str:
    return fake.numerify("%####")


def _imo(fake: Faker, rng: random.Random) -> str:
    return fake.numerify("IMO %######")


def _isbn(fake: Faker, rng: random.Random) -> str:
    return fake.isbn13()


def _price(fake: Faker, rng: random.Random) -> str:
    dollars = round(10 ** rng.uniform(1, 3.6))
    return f"${dollars - 1}.99" if rng.random() < 0.4 else f"${dollars:,}"


def _height(fake: Faker, rng: random.Random) -> str:
    return f"{round(rng.gauss(171, 10))} cm"


def _colour(fake: Faker, rng: random.Random) -> str:
    return rng.choice(_COLOURS)


def _two_colours(fake: Faker, rng: random.Random) -> str:
    a, b = rng.sample(_COLOURS, 2)
    return f"{a} and {b}"


def _product_colour(fake: Faker, rng: random.Random) -> str:
    return f"{rng.choice(_FINISHES)} {rng.choice(_COLOURS)}" if rng.random() < 0.5 else rng.choice(_COLOURS)


def _nickname(fake: Faker, rng: random.Random) -> str:
    return f"the {rng.choice(_NICKNAME_ADJ)} {rng.choice(_NICKNAME_NOUN)}"


def _motto(fake: Faker, rng: random.Random) -> str:
    a, b = rng.sample(_VIRTUES, 2)
    return f"{a} {rng.choice(('and', 'through', 'before', 'with'))} {b}"


def _mascot(fake: Faker, rng: random.Random) -> str:
    return f"the {rng.choice(_MASCOT_ADJ)} {rng.choice(_ANIMALS)}"


# --------------------------------------------------------------------------- entity names

def _company_name(rng: random.Random) -> str:
    return _company(rng)


def _university_name(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.3:
        return f"University of {_city(rng)}"
    if r < 0.5:
        return f"{_last(rng)} College"
    if r < 0.65:
        return f"{_city(rng)} Institute of Technology"
    if r < 0.75:
        return f"{rng.choice(_STATES)} State University"
    if r < 0.9:
        return f"{_last(rng)} University"
    return f"{_city(rng)} Community College"


def _ship_name(rng: random.Random) -> str:
    r = rng.random()
    prefix = rng.choice(_SHIP_PREFIXES)
    if r < 0.15:
        return f"{prefix} {_last(rng)}"
    if r < 0.45:
        return f"{prefix} {_first(rng)} {_last(rng)}"
    if r < 0.65:
        return f"{prefix} {rng.choice(_TITLE_ADJ)} {rng.choice(_TITLE_NOUN)}"
    if r < 0.8:
        return f"{prefix} Spirit of {_city(rng)}"
    return f"{prefix} {_city(rng)}"


def _band_name(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.4:
        return f"The {rng.choice(_TITLE_ADJ)} {rng.choice(_PLURAL_NOUN)}"
    if r < 0.55:
        return f"{rng.choice(_TITLE_ADJ)} {rng.choice(_TITLE_NOUN)}"
    if r < 0.7:
        return f"The {_last(rng)} Brothers"
    if r < 0.85:
        return f"{_first(rng)} and the {rng.choice(_PLURAL_NOUN)}"
    return f"{rng.choice(_TITLE_NOUN)} {rng.choice(_BAND_SINGULAR)}"


def _product_name(rng: random.Random) -> str:
    r = rng.random()
    number = rng.choice((f"{rng.randint(1, 99) * 10}", f"X{rng.randint(1, 30)}", f"S{rng.randint(1, 30)}",
                         f"{rng.randint(2, 12)}"))
    if r < 0.7:
        return f"{_brand(rng)} {rng.choice(_PRODUCT_LINES)} {number}"
    return f"{_brand(rng)} {number}"


def _add_middle_initial(name: str, rng: random.Random) -> str:
    parts = name.split(" ")
    initial = f"{rng.choice(_UPPER)}."
    if len(parts) >= 3 and parts[1].endswith("."):
        parts[1] = initial
    else:
        parts.insert(1, initial)
    return " ".join(parts)


def _with_state(name: str, rng: random.Random) -> str:
    return f"{name}, {rng.choice(_STATES)}"


def _company_extra(name: str, rng: random.Random) -> str:
    return f"{name} {rng.choice(_COMPANY_EXTRAS)}" if rng.random() < 0.6 else f"{name} of {rng.choice(_STATES)}"


def _sequel(name: str, rng: random.Random) -> str:
    return f"{name} {rng.choice(_ROMAN[:6])}"


def _volume(name: str, rng: random.Random) -> str:
    return rng.choice((f"{name}: A Novel", f"{name} and Other Stories", f"{name}, Volume {rng.choice(_ROMAN)}"))


def _of_city(name: str, rng: random.Random) -> str:
    return f"{name} of {_city(rng)}"


def _at_city(name: str, rng: random.Random) -> str:
    return f"{name} at {_city(rng)}"


def _tier(name: str, rng: random.Random) -> str:
    return f"{name} {rng.choice(_PRODUCT_TIERS)}"


# --------------------------------------------------------------------------- types

@dataclass(frozen=True)
class PropertySpec:
    """One property of an entity type: its name (lower case, reads in "The {name} of X"), its
    question family, and ``generate(fake, rng) -> str`` making a value."""

    name: str
    family: str
    generate: ValueGenerator = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown property family {self.family!r}; use one of {FAMILIES}")


@dataclass(frozen=True)
class EntityType:
    """A kind of entity: its properties (each entity gets all of them) and how names are made.

    ``make_name(rng)`` draws a base name; on a clash ``disambiguators`` (tried in turn, at
    random) turn it into a natural variant ("John A. Smith", "Lake Jennifer, Ohio").
    """

    name: str
    properties: tuple[PropertySpec, ...]
    make_name: NameGenerator = field(repr=False, compare=False)
    disambiguators: tuple[Disambiguator, ...] = field(default=(), repr=False, compare=False)

    @property
    def property_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.properties)


def _p(name: str, family: str, generate: ValueGenerator) -> PropertySpec:
    return PropertySpec(name, family, generate)


ENTITY_TYPES: dict[str, EntityType] = {
    t.name: t
    for t in (
        EntityType("company", (
            _p("founding year", "year", _year(1850, 2022)),
            _p("headquarters", "place", _city_value),
            _p("chief executive", "person", _person_value),
            _p("ticker symbol", "code", _ticker),
            _p("employee count", "number", _count(12, 250_000)),
            _p("industry", "phrase", _choice(_INDUSTRIES)),
        ), _company_name, (_company_extra,)),
        EntityType("person", (
            _p("date of birth", "date", _date(1930, 2005)),
            _p("birthplace", "place", _city_value),
            _p("occupation", "phrase", _choice(_OCCUPATIONS)),
            _p("employer", "organisation", _org(_COMPANY_SUFFIXES)),
            _p("favourite colour", "phrase", _colour),
            _p("passport number", "code", _passport),
            _p("height", "number", _height),
        ), _person, (_add_middle_initial,)),
        EntityType("city", (
            _p("population", "number", _count(800, 3_000_000)),
            _p("mayor", "person", _person_value),
            _p("founding year", "year", _year(1620, 1950)),
            _p("postal code", "code", _postal_code),
            _p("sister city", "place", _city_value),
            _p("nickname", "phrase", _nickname),
        ), _city, (_with_state,)),
        EntityType("book", (
            _p("author", "person", _person_value),
            _p("publication year", "year", _year(1800, 2024)),
            _p("publisher", "organisation", _org(("Press", "Books", "Publishing", "House", "Editions"))),
            _p("genre", "phrase", _choice(_BOOK_GENRES)),
            _p("catalogue number", "code", _isbn),
            _p("page count", "number", _count(64, 1400)),
            _p("setting", "place", _city_value),
        ), _title, (_volume,)),
        EntityType("film", (
            _p("director", "person", _person_value),
            _p("release date", "date", _date(1925, 2024)),
            _p("studio", "organisation", _org(("Pictures", "Studios", "Films", "Entertainment", "Productions"))),
            _p("genre", "phrase", _choice(_FILM_GENRES)),
            _p("running time", "number", _count(70, 220, unit=" minutes")),
            _p("filming location", "place", _city_value),
            _p("lead actor", "person", _person_value),
        ), _title, (_sequel,)),
        EntityType("product", (
            _p("manufacturer", "organisation", _org(("Electronics", "Industries", "Manufacturing", "Devices",
                                                     "Technologies", "Appliances", "Corporation", "Labs"))),
            _p("model number", "code", _model_number),
            _p("launch date", "date", _date(1985, 2025)),
            _p("price", "number", _price),
            _p("colour", "phrase", _product_colour),
            _p("designer", "person", _person_value),
            _p("category", "phrase", _choice(_PRODUCT_CATEGORIES)),
        ), _product_name, (_tier,)),
        EntityType("university", (
            _p("founding year", "year", _year(1636, 2010)),
            _p("main campus", "place", _city_value),
            _p("president", "person", _person_value),
            _p("student enrollment", "number", _count(400, 70_000)),
            _p("motto", "phrase", _motto),
            _p("colour scheme", "phrase", _two_colours),
            _p("mascot", "phrase", _mascot),
        ), _university_name, (_at_city,)),
        EntityType("ship", (
            _p("launch year", "year", _year(1880, 2023)),
            _p("home port", "place", _city_value),
            _p("captain", "person", _person_value),
            _p("registration number", "code", _imo),
            _p("gross tonnage", "number", _count(300, 220_000)),
            _p("shipbuilder", "organisation", _org(("Shipyards", "Marine", "Shipbuilding", "Dockyards",
                                                    "Naval Works"))),
            _p("hull colour", "phrase", _colour),
        ), _ship_name, (_sequel,)),
        EntityType("band", (
            _p("formation year", "year", _year(1955, 2022)),
            _p("hometown", "place", _city_value),
            _p("lead singer", "person", _person_value),
            _p("record label", "organisation", _org(("Records", "Music", "Recordings", "Sound"))),
            _p("genre", "phrase", _choice(_MUSIC_GENRES)),
            _p("debut album", "phrase", _title_value),
        ), _band_name, (_of_city,)),
    )
}


def _family_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for etype in ENTITY_TYPES.values():
        for spec in etype.properties:
            if table.setdefault(spec.name, spec.family) != spec.family:
                raise AssertionError(f"property {spec.name!r} has two families")
    return table


_PROPERTY_FAMILY = _family_table()


def property_family(property_name: str) -> str:
    """The question family of a synthetic property ("founding year" -> "year"); KeyError if unknown."""
    try:
        return _PROPERTY_FAMILY[property_name]
    except KeyError:
        raise KeyError(f"{property_name!r} is not a synthetic property; known: "
                       f"{', '.join(sorted(_PROPERTY_FAMILY))}") from None


def _resolve_types(entity_types: Sequence[str] | None) -> tuple[EntityType, ...]:
    if entity_types is None:
        return tuple(ENTITY_TYPES.values())
    if isinstance(entity_types, str):
        entity_types = (entity_types,)
    unknown = [t for t in entity_types if t not in ENTITY_TYPES]
    if unknown or not entity_types:
        raise ValueError(f"unknown entity type(s) {unknown}; choose from {sorted(ENTITY_TYPES)}")
    return tuple(ENTITY_TYPES[t] for t in dict.fromkeys(entity_types))


def _unique_name(etype: EntityType, taken: set[str], rng: random.Random) -> str:
    name = etype.make_name(rng)
    if name not in taken:
        return name
    for _ in range(6):
        alternative = etype.make_name(rng)  # draw again, then try a natural variant of the clash
        if alternative not in taken:
            return alternative
        if etype.disambiguators:
            candidate = rng.choice(etype.disambiguators)(name, rng)
            if candidate not in taken:
                return candidate
    for numeral in itertools.chain(_ROMAN, (str(i) for i in itertools.count(len(_ROMAN) + 2))):
        candidate = f"{name} {numeral}"
        if candidate not in taken:
            return candidate
    raise AssertionError("unreachable")


def random_entity_name(rng: random.Random, entity_type: str | None = None) -> str:
    """One entity name of the given (or a random) type, from ``rng`` alone; not checked for clashes."""
    etype = ENTITY_TYPES[entity_type] if entity_type else rng.choice(tuple(ENTITY_TYPES.values()))
    return etype.make_name(rng)


def synthetic_triples(n_entities: int, *, seed: int = 0, split: str = "train",
                      entity_types: Sequence[str] | None = None) -> list[Triple]:
    """``n_entities`` fictional entities with all properties of their type, grouped by entity.

    ``split`` is "train" or "test" (names with ``split_of(name) == split``; "test" draws ~10x
    more candidate names) or "all" (no filter). ``entity_types`` restricts the mix (default:
    all of ``ENTITY_TYPES``, chosen uniformly per entity). Deterministic under ``seed``.
    """
    from faker import Faker

    if isinstance(n_entities, bool) or not isinstance(n_entities, int) or n_entities < 0:
        raise ValueError(f"n_entities must be a non-negative int, got {n_entities!r}")
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    types = _resolve_types(entity_types)
    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)

    taken: set[str] = set()
    triples: list[Triple] = []
    while len(taken) < n_entities:
        etype = rng.choice(types)
        name = _unique_name(etype, taken, rng)
        if split != "all" and split_of(name) != split:
            continue
        taken.add(name)
        for spec in etype.properties:
            triples.append(Triple(name, spec.name, spec.generate(fake, rng)))
    return triples


def synthetic_kb(n_entities: int, *, seed: int = 0, split: str = "train", **kw) -> KnowledgeBase:
    """``synthetic_triples`` as a ``KnowledgeBase`` (source "synthetic(seed=..., split=...)")."""
    triples = synthetic_triples(n_entities, seed=seed, split=split, **kw)
    return KnowledgeBase(triples, source=f"synthetic(n={n_entities}, seed={seed}, split={split})")


def synthetic_triples_exactly(n_triples: int, *, seed: int = 0, split: str = "train") -> list[Triple]:
    """The first `n_triples` triples of a synthetic KB just large enough to hold them (for benchmarks)."""
    entities = max(1, math.ceil(n_triples / 6))
    while True:
        triples = synthetic_triples(entities, seed=seed, split=split)
        if len(triples) >= n_triples:
            return triples[:n_triples]
        entities = math.ceil(entities * 1.25) + 1
