"""Question/answer examples over a list of triples, for training and evaluating KB adapters.

Four kinds of example (``make_examples``):

* ``simple``: one fact. "Who is the author of The Silent Harbor?" ->
  "The author of The Silent Harbor is Karen Smith." (always ``simple_answer(triple)``).
* ``multi``: 2-4 facts, the same property of several entities or several properties of one
  entity; the answer joins the simple clauses: "The X of A is V1, and the X of B is V2."
* ``open``: "Tell me about A." -> 2-3 of A's facts in the same clause form.
* ``unanswerable``: a (name, property) pair that is not in the triples -> ``REFUSAL``.

Questions are worded per property *family* (``kb_builders.synthetic.FAMILIES``). Training uses
``TRAIN_PHRASINGS``; ``HELDOUT_PHRASINGS`` are never used in training (no template is in both)
and serve as the "paraphrased questions" of evaluation (``heldout_phrasings=True``). A few
properties also have their own wordings ("When was {name} founded?"), split the same way.
Properties that are not synthetic get a family guessed from their name (``family_of``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from kblam.kb import Triple

from .synthetic import ENTITY_TYPES, FAMILIES, property_family, random_entity_name

__all__ = [
    "HELDOUT_MULTI_ENTITY_PHRASINGS",
    "HELDOUT_MULTI_PROPERTY_PHRASINGS",
    "HELDOUT_OPEN_PHRASINGS",
    "HELDOUT_PHRASINGS",
    "HELDOUT_PROPERTY_PHRASINGS",
    "KINDS",
    "REFUSAL",
    "TRAIN_MULTI_ENTITY_PHRASINGS",
    "TRAIN_MULTI_PROPERTY_PHRASINGS",
    "TRAIN_OPEN_PHRASINGS",
    "TRAIN_PHRASINGS",
    "TRAIN_PROPERTY_PHRASINGS",
    "QAExample",
    "family_of",
    "join_clauses",
    "make_examples",
    "question_for",
    "simple_answer",
]

REFUSAL = "I'm sorry, I cannot find that in the knowledge base."
KINDS = ("simple", "multi", "open", "unanswerable")
DEFAULT_MIX: Mapping[str, float] = MappingProxyType(
    {"simple": 0.7, "multi": 0.1, "open": 0.1, "unanswerable": 0.1})
# How often a property with its own wordings ("When was {name} founded?") uses one of them.
PROPERTY_SPECIFIC_RATE = 0.3

# --------------------------------------------------------------------------- phrasings

_GENERIC_TRAIN = (
    "What is the {property} of {name}?",
    "What's the {property} of {name}?",
    "Tell me the {property} of {name}.",
    "Give me the {property} of {name}.",
    "Can you tell me the {property} of {name}?",
    "Do you know the {property} of {name}?",
    "What is {name}'s {property}?",
    "I'd like to know the {property} of {name}.",
    "Please state the {property} of {name}.",
    "Look up the {property} of {name}.",
    "{name}: what is the {property}?",
)
_GENERIC_HELDOUT = (
    "According to the knowledge base, what is the {property} of {name}?",
    "I'm curious about {name}. What is its {property}?",
    "Remind me, what is the {property} of {name}?",
)
_FAMILY_TRAIN = {
    "year": (
        "Which year is the {property} of {name}?",
        "What year is listed as the {property} of {name}?",
        "What year is given as the {property} of {name}?",
        "Which year is recorded as {name}'s {property}?",
        "In what year does the {property} of {name} fall?",
        "Tell me which year is the {property} of {name}.",
    ),
    "person": (
        "Who is the {property} of {name}?",
        "Who is listed as the {property} of {name}?",
        "Which person is the {property} of {name}?",
        "Who is {name}'s {property}?",
        "Name the {property} of {name}.",
        "Who is recorded as the {property} of {name}?",
    ),
    "place": (
        "Where is the {property} of {name}?",
        "Which place is the {property} of {name}?",
        "What place is listed as the {property} of {name}?",
        "Which town is given as the {property} of {name}?",
        "Name the place that is the {property} of {name}.",
        "What location is recorded as {name}'s {property}?",
    ),
    "code": (
        "What code is the {property} of {name}?",
        "Which code is listed as the {property} of {name}?",
        "What identifier is given as the {property} of {name}?",
        "What is the exact {property} of {name}?",
        "Which string is recorded as {name}'s {property}?",
        "Spell out the {property} of {name}.",
    ),
    "number": (
        "What number is given as the {property} of {name}?",
        "What figure is listed as the {property} of {name}?",
        "Which number is the {property} of {name}?",
        "What value is recorded for the {property} of {name}?",
        "What does the knowledge base give as the {property} of {name}?",
        "State the figure for {name}'s {property}.",
    ),
    "date": (
        "What date is the {property} of {name}?",
        "Which date is listed as the {property} of {name}?",
        "Which calendar date is given as the {property} of {name}?",
        "What day is recorded as {name}'s {property}?",
        "Give the exact date that is the {property} of {name}.",
        "Tell me the date for the {property} of {name}.",
    ),
    "phrase": (
        "What is listed as the {property} of {name}?",
        "How is the {property} of {name} described?",
        "Describe the {property} of {name}.",
        "What is recorded as {name}'s {property}?",
        "Which {property} does {name} have?",
        "What is given as the {property} of {name}?",
        "In a few words, what is the {property} of {name}?",
    ),
    "organisation": (
        "Which organisation is the {property} of {name}?",
        "Which company is listed as the {property} of {name}?",
        "What organisation is given as {name}'s {property}?",
        "Name the organisation that is the {property} of {name}.",
        "Which firm is recorded as the {property} of {name}?",
        "Who is the {property} of {name}?",
    ),
}
_FAMILY_HELDOUT = {
    "year": (
        "Which year should I note down as the {property} of {name}?",
        "For {name}, what year counts as the {property}?",
    ),
    "person": (
        "Do you happen to know who the {property} of {name} is?",
        "Which individual is named as {name}'s {property}?",
    ),
    "place": (
        "Which locality is named as the {property} of {name}?",
        "What is the name of the place that is the {property} of {name}?",
    ),
    "code": (
        "What characters make up the {property} of {name}?",
        "Could you read out {name}'s {property}?",
    ),
    "number": (
        "What is the recorded figure for the {property} of {name}?",
        "What quantity is stated as the {property} of {name}?",
    ),
    "date": (
        "Which day, month and year make up the {property} of {name}?",
        "What exact calendar date is {name}'s {property}?",
    ),
    "phrase": (
        "How would you sum up the {property} of {name}?",
        "What entry appears under the {property} of {name}?",
    ),
    "organisation": (
        "Which business is named as the {property} of {name}?",
        "Could you name the organisation that is {name}'s {property}?",
    ),
}

TRAIN_PHRASINGS: dict[str, tuple[str, ...]] = {f: _GENERIC_TRAIN + _FAMILY_TRAIN[f] for f in FAMILIES}
HELDOUT_PHRASINGS: dict[str, tuple[str, ...]] = {f: _GENERIC_HELDOUT + _FAMILY_HELDOUT[f] for f in FAMILIES}

# Wordings for one property only (no {property} needed), split into train and held out alike.
TRAIN_PROPERTY_PHRASINGS: dict[str, tuple[str, ...]] = {
    "founding year": ("When was {name} founded?", "In what year was {name} founded?",
                      "What year was {name} established?"),
    "date of birth": ("When was {name} born?", "What is {name}'s birthday?"),
    "birthplace": ("Where was {name} born?", "In which town was {name} born?"),
    "headquarters": ("Where is {name} headquartered?", "Where is {name} based?"),
    "author": ("Who wrote {name}?",),
    "director": ("Who directed {name}?",),
    "population": ("How many people live in {name}?",),
    "publication year": ("When was {name} published?",),
    "release date": ("When was {name} released?",),
    "lead singer": ("Who sings for {name}?",),
    "launch year": ("When was {name} launched?",),
    "employee count": ("How many employees does {name} have?", "How many people work at {name}?"),
    "student enrollment": ("How many students does {name} have?",),
    "page count": ("How many pages does {name} have?",),
    "occupation": ("What does {name} do for a living?",),
    "employer": ("Who does {name} work for?",),
}
HELDOUT_PROPERTY_PHRASINGS: dict[str, tuple[str, ...]] = {
    "founding year": ("Which year did {name} come into being?",),
    "date of birth": ("On what day was {name} born?",),
    "birthplace": ("What town does {name} come from originally?",),
    "headquarters": ("In which town does {name} have its head office?",),
    "author": ("Who penned {name}?",),
    "director": ("Who was behind the camera for {name}?",),
    "population": ("How many residents does {name} have?",),
    "publication year": ("In which year did {name} first appear in print?",),
    "release date": ("On what date did {name} come out?",),
    "lead singer": ("Who fronts {name}?",),
    "launch year": ("In which year was {name} first put to sea?",),
    "employee count": ("What is the size of {name}'s workforce?",),
    "student enrollment": ("How many students are enrolled at {name}?",),
    "page count": ("How long is {name} in pages?",),
    "occupation": ("What is {name}'s line of work?",),
    "employer": ("Which company employs {name}?",),
}

# multi: one property of several entities ({names} is "A and B" / "A, B and C").
TRAIN_MULTI_ENTITY_PHRASINGS = (
    "What is the {property} of {names}?",
    "Tell me the {property} of {names}.",
    "Give me the {property} of each of {names}.",
    "Can you list the {property} of {names}?",
    "Look up the {property} of {names}.",
)
HELDOUT_MULTI_ENTITY_PHRASINGS = (
    "For each of {names}, what is the {property}?",
    "Compare the {property} of {names}.",
)
# multi: several properties of one entity ({properties} is "X and Y" / "X, Y and Z").
TRAIN_MULTI_PROPERTY_PHRASINGS = (
    "What are the {properties} of {name}?",
    "Tell me the {properties} of {name}.",
    "Give me the {properties} of {name}.",
    "What do you know about the {properties} of {name}?",
    "Look up the {properties} of {name}.",
)
HELDOUT_MULTI_PROPERTY_PHRASINGS = (
    "For {name}, what are the {properties}?",
    "I need the {properties} of {name}.",
)
TRAIN_OPEN_PHRASINGS = (
    "Tell me about {name}.",
    "What do you know about {name}?",
    "Give me some facts about {name}.",
    "Describe {name}.",
    "What can you tell me about {name}?",
    "Share some information about {name}.",
)
HELDOUT_OPEN_PHRASINGS = (
    "Fill me in on {name}.",
    "What information do you have on {name}?",
    "Summarise what is known about {name}.",
)

# Guessing the family of a property that is not synthetic, from words in its name.
_GUESSES = (
    ("date", r"\b(date|birthday|day)\b"),
    ("year", r"\byear\b"),
    ("number", r"\b(count|number of|population|height|weight|price|size|length|area|age|tonnage|amount)\b"),
    ("code", r"\b(code|number|id|identifier|symbol|isbn|serial)\b"),
    ("place", r"\b(place|city|town|country|location|headquarters|capital|port|hometown|birthplace|campus)\b"),
    ("person", r"\b(author|director|founder|ceo|president|mayor|captain|singer|actor|designer|leader|"
               r"owner|manager|chief executive|spouse|father|mother|parent|child)\b"),
    ("organisation", r"\b(company|publisher|studio|label|manufacturer|employer|organi[sz]ation|builder)\b"),
)


def family_of(property_name: str) -> str:
    """The family of a property: exact for synthetic properties, else guessed from its words
    ("phrase", whose wordings fit anything, when nothing matches)."""
    try:
        return property_family(property_name)
    except KeyError:
        pass
    lowered = property_name.lower()
    for family, pattern in _GUESSES:
        if re.search(pattern, lowered):
            return family
    return "phrase"


# --------------------------------------------------------------------------- examples

@dataclass(frozen=True)
class QAExample:
    question: str
    answer: str
    kind: str
    sources: tuple[int, ...] = ()

    def to_record(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.answer, "kind": self.kind,
                "sources": list(self.sources)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> QAExample:
        return cls(record["question"], record["answer"], record["kind"], tuple(record.get("sources", ())))


def simple_answer(triple: Triple) -> str:
    return f"The {triple.property} of {triple.name} is {triple.value}."


def _clause(triple: Triple, first: bool) -> str:
    return f"{'The' if first else 'the'} {triple.property} of {triple.name} is {triple.value}"


def join_clauses(triples: Sequence[Triple]) -> str:
    """"The X of A is V1." / "The X of A is V1, and the X of B is V2." / "..., ..., and ..."."""
    clauses = [_clause(t, i == 0) for i, t in enumerate(triples)]
    if not clauses:
        raise ValueError("no triples to join")
    if len(clauses) == 1:
        return clauses[0] + "."
    return ", ".join(clauses[:-1]) + ", and " + clauses[-1] + "."


def _and_list(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def question_for(triple: Triple, rng: random.Random, *, heldout: bool = False) -> str:
    """A question asking for ``triple``'s value; its entity name appears verbatim."""
    own = (HELDOUT_PROPERTY_PHRASINGS if heldout else TRAIN_PROPERTY_PHRASINGS).get(triple.property)
    if own and rng.random() < PROPERTY_SPECIFIC_RATE:
        template = rng.choice(own)
    else:
        template = rng.choice((HELDOUT_PHRASINGS if heldout else TRAIN_PHRASINGS)[family_of(triple.property)])
    return template.format(name=triple.name, property=triple.property)


def _normalised_mix(mix: Mapping[str, float]) -> dict[str, float]:
    unknown = [k for k in mix if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown example kind(s) {unknown}; use {KINDS}")
    if any(not isinstance(v, (int, float)) or v < 0 or v != v for v in mix.values()):
        raise ValueError(f"mix weights must be non-negative numbers, got {dict(mix)}")
    total = sum(mix.values())
    if total <= 0:
        raise ValueError("mix weights sum to zero")
    return {k: mix.get(k, 0) / total for k in KINDS}


def _kind_counts(n: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder rounding: the counts sum to n and each is within 1 of n * share."""
    exact = {k: n * share for k, share in mix.items()}
    counts = {k: int(v) for k, v in exact.items()}
    by_remainder = sorted(KINDS, key=lambda k: (-(exact[k] - counts[k]), KINDS.index(k)))
    for k in by_remainder[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


class _Index:
    """Lookups over the triples that the example makers share."""

    def __init__(self, triples: Sequence[Triple]):
        self.triples = triples
        self.by_name: dict[str, list[int]] = {}
        self.by_property: dict[str, list[int]] = {}
        for i, t in enumerate(triples):
            self.by_name.setdefault(t.name, []).append(i)
            self.by_property.setdefault(t.property, []).append(i)
        self.keys = {(t.name, t.property) for t in triples}
        self.names_per_property = {p: len({triples[i].name for i in ix}) for p, ix in self.by_property.items()}
        self.properties_per_name = {n: len({triples[i].property for i in ix}) for n, ix in self.by_name.items()}
        self.names = list(self.by_name)
        self.properties = list(self.by_property)
        # Properties of other entity types, for "asked about a property it does not have".
        self.other_properties = list(dict.fromkeys(
            p.name for et in ENTITY_TYPES.values() for p in et.properties))


def _pick_distinct(rng: random.Random, indices: Sequence[int], k: int, key) -> list[int]:
    """Up to k indices with distinct key(index), chosen at random (by rejection, then by scan)."""
    chosen: list[int] = []
    seen: set = set()
    for _ in range(4 * k):
        i = rng.choice(indices)
        if key(i) not in seen:
            seen.add(key(i))
            chosen.append(i)
            if len(chosen) == k:
                return chosen
    pool = list(indices)
    rng.shuffle(pool)
    for i in pool:
        if key(i) not in seen:
            seen.add(key(i))
            chosen.append(i)
            if len(chosen) == k:
                break
    return chosen


def _simple(ix: _Index, rng: random.Random, heldout: bool) -> QAExample:
    i = rng.randrange(len(ix.triples))
    t = ix.triples[i]
    return QAExample(question_for(t, rng, heldout=heldout), simple_answer(t), "simple", (i,))


def _multi(ix: _Index, rng: random.Random, heldout: bool) -> QAExample | None:
    start = rng.randrange(len(ix.triples))
    anchor = ix.triples[start]
    k = rng.randint(2, 4)
    same_property = ix.by_property[anchor.property]
    same_entity = ix.by_name[anchor.name]
    modes = []
    if ix.names_per_property[anchor.property] >= 2:
        modes.append("entities")
    if ix.properties_per_name[anchor.name] >= 2:
        modes.append("properties")
    if not modes:
        return None
    if rng.choice(modes) == "entities":
        others = _pick_distinct(rng, same_property, k, key=lambda i: ix.triples[i].name)
        chosen = [start] + [i for i in others if ix.triples[i].name != anchor.name][: k - 1]
        rng.shuffle(chosen)
        facts = [ix.triples[i] for i in chosen]
        template = rng.choice(HELDOUT_MULTI_ENTITY_PHRASINGS if heldout else TRAIN_MULTI_ENTITY_PHRASINGS)
        question = template.format(property=anchor.property, names=_and_list([t.name for t in facts]))
    else:
        others = _pick_distinct(rng, same_entity, k, key=lambda i: ix.triples[i].property)
        chosen = [start] + [i for i in others if ix.triples[i].property != anchor.property][: k - 1]
        rng.shuffle(chosen)
        facts = [ix.triples[i] for i in chosen]
        template = rng.choice(HELDOUT_MULTI_PROPERTY_PHRASINGS if heldout else TRAIN_MULTI_PROPERTY_PHRASINGS)
        question = template.format(name=anchor.name, properties=_and_list([t.property for t in facts]))
    return QAExample(question, join_clauses(facts), "multi", tuple(chosen))


def _open(ix: _Index, rng: random.Random, heldout: bool) -> QAExample:
    name = ix.triples[rng.randrange(len(ix.triples))].name
    own = ix.by_name[name]
    # One fact per property (a multi-valued property would otherwise read as a contradiction).
    chosen = sorted(_pick_distinct(rng, own, rng.choice((2, 3)), key=lambda i: ix.triples[i].property))
    template = rng.choice(HELDOUT_OPEN_PHRASINGS if heldout else TRAIN_OPEN_PHRASINGS)
    return QAExample(template.format(name=name), join_clauses([ix.triples[i] for i in chosen]), "open",
                     tuple(chosen))


def _unanswerable(ix: _Index, rng: random.Random, heldout: bool, absent: Sequence[Triple]) -> QAExample:
    if absent:
        triple = absent[rng.randrange(len(absent))]
    else:
        triple = None
        if rng.random() < 0.5:  # a known entity, asked about a property it does not have
            name = ix.names[rng.randrange(len(ix.names))]
            has = {ix.triples[i].property for i in ix.by_name[name]}
            for pool in (ix.properties, ix.other_properties):
                missing = [p for p in pool if p not in has]
                if missing:
                    triple = Triple(name, rng.choice(missing), "?")
                    break
        while triple is None:  # an entity the KB does not have, asked about one of the KB's properties
            name = random_entity_name(rng)
            if name not in ix.by_name:
                triple = Triple(name, rng.choice(ix.properties), "?")
    return QAExample(question_for(triple, rng, heldout=heldout), REFUSAL, "unanswerable", ())


def make_examples(triples: Sequence[Triple], n: int, *, seed: int = 0,
                  mix: Mapping[str, float] = DEFAULT_MIX, heldout_phrasings: bool = False,
                  absent: Sequence[Triple] = ()) -> list[QAExample]:
    """``n`` question/answer examples about ``triples``, kinds in the proportions of ``mix``.

    ``sources`` index into ``triples``. Unanswerable questions ask about ``absent`` triples
    (those whose (name, property) is not in ``triples``) when given, else about a property an
    entity lacks or an entity that is not there. ``heldout_phrasings=True`` words every
    question with held-out templates only. Deterministic under ``seed``; kinds are shuffled.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    counts = _kind_counts(n, _normalised_mix(mix))
    triples = list(triples)
    if n and not triples:
        raise ValueError("make_examples needs at least one triple")
    if not n:
        return []
    ix = _Index(triples)
    absent_ok = [t for t in absent if (t.name, t.property) not in ix.keys]
    rng = random.Random(seed)
    kinds = [k for k in KINDS for _ in range(counts[k])]
    rng.shuffle(kinds)
    out: list[QAExample] = []
    for kind in kinds:
        if kind == "simple":
            example = _simple(ix, rng, heldout_phrasings)
        elif kind == "multi":
            # A KB with no two facts to combine falls back to simple questions.
            example = _multi(ix, rng, heldout_phrasings) or _simple(ix, rng, heldout_phrasings)
        elif kind == "open":
            example = _open(ix, rng, heldout_phrasings)
        else:
            example = _unanswerable(ix, rng, heldout_phrasings, absent_ok)
        out.append(example)
    return out
