"""Question/answer examples over a list of triples, for training and evaluating KB adapters.

Four kinds of example (``make_examples``):

* ``simple``: one fact. "Who wrote The Silent Harbor?" -> "The Silent Harbor was written by ⟦v0⟧."
* ``multi``: 2-4 facts, the same property of several entities or several properties of one
  entity: "The X of A is ⟦v0⟧, and the X of B is ⟦v1⟧."
* ``open``: "Tell me about A." -> 2-4 of A's facts quoted whole: "⟦f0⟧. ⟦f1⟧."
* ``unanswerable``: a (name, property) pair that is not in the triples -> "⟦r⟧", the refusal.

Answers carry span markers (``SPAN``), the places where the model quotes the KB (kblam.spans):
``⟦vK⟧`` the value of the example's K-th source, ``⟦fK⟧`` its whole fact ("the {property} of {name}
is {value}"), ``⟦r⟧`` the refusal (the null slot). ``render(answer, facts)`` gives the text a reader
sees; ``segments(answer)`` the pieces training tokenises. The words around a span echo the question
(its wording of the property and of the name), which is all the LM can know of them.

Questions are worded per property *family* (``kb_builders.synthetic.FAMILIES``) and per property
("When was {name} founded?"). Training uses ``TRAIN_*`` wordings; ``HELDOUT_*`` are never used in
training (no template is in both) and serve evaluation (``heldout_phrasings=True``). With
``variants=True`` questions are also asked as people type them: a property named by a synonym
(``TRAIN_SYNONYMS``), all lower case, no question mark, a one-letter typo in the name.
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
    "render",
    "segments",
    "simple_answer",
]

REFUSAL = "I'm sorry, I cannot find that in the knowledge base."
KINDS = ("simple", "multi", "open", "unanswerable")
DEFAULT_MIX: Mapping[str, float] = MappingProxyType(
    {"simple": 0.7, "multi": 0.1, "open": 0.1, "unanswerable": 0.1})
# How often a property with its own wordings ("When was {name} founded?") uses one of them.
PROPERTY_SPECIFIC_RATE = 0.3
# With variants=True: how often the property is named by a synonym, the question is all lower case,
# loses its question mark, or has a one-letter typo in the name.
SYNONYM_RATE, LOWER_RATE, BARE_RATE, TYPO_RATE, KEYWORD_RATE = 0.25, 0.12, 0.2, 0.08, 0.08
MAX_OPEN_FACTS = 4
SPAN = re.compile(r"⟦(?:([vf])(\d+)|r)⟧")

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
    "What's {name}'s {property}?",
    "{property} of {name}?",
    "What is the {property} for {name}?",
)
# Typed as a search box query (variants only: they would read any "X Y" as a question about X).
_KEYWORD_TRAIN = ("{name} {property}", "{name}'s {property}?", "{name}'s {property}")
_GENERIC_HELDOUT = (
    "According to the knowledge base, what is the {property} of {name}?",
    "I'm curious about {name}. What is its {property}?",
    "Remind me, what is the {property} of {name}?",
    "Any idea what {name}'s {property} is?",
    "{property} for {name}?",
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

# Wordings of one property only, each with the answer that echoes it (⟦v0⟧ is the value).
_PROPERTY_TRAIN: dict[str, tuple[tuple[str, str], ...]] = {
    "founding year": (("When was {name} founded?", "{name} was founded in ⟦v0⟧."),
                      ("In what year was {name} founded?", "{name} was founded in ⟦v0⟧."),
                      ("What year was {name} established?", "{name} was established in ⟦v0⟧."),
                      ("When was {name} established?", "{name} was established in ⟦v0⟧.")),
    "date of birth": (("When was {name} born?", "{name} was born on ⟦v0⟧."),
                      ("What is {name}'s birthday?", "{name}'s birthday is ⟦v0⟧."),
                      ("On which date was {name} born?", "{name} was born on ⟦v0⟧.")),
    "birthplace": (("Where was {name} born?", "{name} was born in ⟦v0⟧."),
                   ("In which town was {name} born?", "{name} was born in ⟦v0⟧."),
                   ("Where does {name} come from?", "{name} comes from ⟦v0⟧.")),
    "headquarters": (("Where is {name} headquartered?", "{name} is headquartered in ⟦v0⟧."),
                     ("Where is {name} based?", "{name} is based in ⟦v0⟧."),
                     ("Where are {name}'s headquarters?", "{name}'s headquarters are in ⟦v0⟧.")),
    "chief executive": (("Who runs {name}?", "{name} is run by ⟦v0⟧."),
                        ("Who is in charge of {name}?", "⟦v0⟧ is in charge of {name}.")),
    "ticker symbol": (("What is {name} traded as?", "{name} is traded as ⟦v0⟧."),
                      ("Under which symbol does {name} trade?", "{name} trades under ⟦v0⟧.")),
    "employee count": (("How many employees does {name} have?", "{name} has ⟦v0⟧ employees."),
                       ("How many people work at {name}?", "⟦v0⟧ people work at {name}.")),
    "industry": (("Which industry is {name} in?", "{name} is in ⟦v0⟧."),
                 ("What business is {name} in?", "{name} is in ⟦v0⟧.")),
    "occupation": (("What does {name} do for a living?", "{name} works as ⟦v0⟧."),
                   ("What is {name}'s job?", "{name}'s job is ⟦v0⟧.")),
    "employer": (("Who does {name} work for?", "{name} works for ⟦v0⟧."),
                 ("Where does {name} work?", "{name} works at ⟦v0⟧.")),
    "favourite colour": (("What colour does {name} like best?", "{name} likes ⟦v0⟧ best."),
                         ("What is {name}'s favorite color?", "{name}'s favorite color is ⟦v0⟧.")),
    "passport number": (("What number is on {name}'s passport?", "The number on {name}'s passport is ⟦v0⟧."),),
    "height": (("How tall is {name}?", "{name} is ⟦v0⟧ tall."),
               ("What height is {name}?", "{name} is ⟦v0⟧ tall.")),
    "population": (("How many people live in {name}?", "⟦v0⟧ people live in {name}."),
                   ("How many inhabitants does {name} have?", "{name} has ⟦v0⟧ inhabitants."),
                   ("How populous is {name}?", "{name} has a population of ⟦v0⟧.")),
    "mayor": (("Who governs {name}?", "{name} is governed by ⟦v0⟧."),
              ("Who runs the city of {name}?", "The mayor of {name} is ⟦v0⟧.")),
    "sister city": (("Which city is twinned with {name}?", "{name} is twinned with ⟦v0⟧."),),
    "nickname": (("What is {name} known as?", "{name} is known as ⟦v0⟧."),
                 ("What is {name} nicknamed?", "{name} is nicknamed ⟦v0⟧.")),
    "author": (("Who wrote {name}?", "{name} was written by ⟦v0⟧."),
               ("Who is the writer of {name}?", "The writer of {name} is ⟦v0⟧.")),
    "publication year": (("When was {name} published?", "{name} was published in ⟦v0⟧."),
                         ("What year did {name} come out?", "{name} came out in ⟦v0⟧.")),
    "publisher": (("Who published {name}?", "{name} was published by ⟦v0⟧."),),
    "genre": (("What genre is {name}?", "{name} is ⟦v0⟧."),),
    "page count": (("How many pages does {name} have?", "{name} has ⟦v0⟧ pages."),
                   ("How many pages is {name}?", "{name} is ⟦v0⟧ pages long.")),
    "setting": (("Where is {name} set?", "{name} is set in ⟦v0⟧."),
                ("Where does {name} take place?", "{name} takes place in ⟦v0⟧.")),
    "director": (("Who directed {name}?", "{name} was directed by ⟦v0⟧."),
                 ("Who made the film {name}?", "{name} was made by ⟦v0⟧.")),
    "release date": (("When was {name} released?", "{name} was released on ⟦v0⟧."),
                     ("When did {name} come out?", "{name} came out on ⟦v0⟧.")),
    "studio": (("Which studio made {name}?", "{name} was made by ⟦v0⟧."),
               ("Who produced {name}?", "{name} was produced by ⟦v0⟧.")),
    "running time": (("How long does {name} run?", "{name} runs for ⟦v0⟧."),
                     ("How many minutes long is {name}?", "{name} is ⟦v0⟧ long.")),
    "filming location": (("Where was {name} filmed?", "{name} was filmed in ⟦v0⟧."),
                         ("Where was {name} shot?", "{name} was shot in ⟦v0⟧.")),
    "lead actor": (("Who stars in {name}?", "{name} stars ⟦v0⟧."),
                   ("Who plays the lead in {name}?", "The lead in {name} is played by ⟦v0⟧.")),
    "manufacturer": (("Who makes {name}?", "{name} is made by ⟦v0⟧."),
                     ("Who manufactures {name}?", "{name} is manufactured by ⟦v0⟧.")),
    "launch date": (("On what date was {name} launched?", "{name} was launched on ⟦v0⟧."),
                    ("When did {name} go on sale?", "{name} went on sale on ⟦v0⟧.")),
    "price": (("How much does {name} cost?", "{name} costs ⟦v0⟧."),
              ("How much is {name}?", "{name} is ⟦v0⟧."),
              ("What does {name} sell for?", "{name} sells for ⟦v0⟧.")),
    "colour": (("What colour is {name}?", "{name} is ⟦v0⟧."),
               ("What color is {name}?", "{name} is ⟦v0⟧.")),
    "designer": (("Who designed {name}?", "{name} was designed by ⟦v0⟧."),),
    "category": (("What kind of product is {name}?", "{name} is in the category ⟦v0⟧."),),
    "main campus": (("Where is {name}'s main campus?", "{name}'s main campus is in ⟦v0⟧."),
                    ("Where is {name} located?", "{name} is located in ⟦v0⟧.")),
    "president": (("Who heads {name}?", "{name} is headed by ⟦v0⟧."),
                  ("Who is the head of {name}?", "The head of {name} is ⟦v0⟧.")),
    "student enrollment": (("How many students does {name} have?", "{name} has ⟦v0⟧ students."),
                           ("How many students attend {name}?", "⟦v0⟧ students attend {name}.")),
    "motto": (("What does {name}'s motto say?", "{name}'s motto is ⟦v0⟧."),),
    "colour scheme": (("What are {name}'s colours?", "{name}'s colours are ⟦v0⟧."),
                      ("What colors does {name} use?", "{name} uses ⟦v0⟧.")),
    "mascot": (("Who is {name}'s mascot?", "{name}'s mascot is ⟦v0⟧."),),
    "launch year": (("What year was {name} launched?", "{name} was launched in ⟦v0⟧."),
                    ("In which year was {name} launched?", "{name} was launched in ⟦v0⟧.")),
    "home port": (("Which port is {name} registered in?", "{name} is registered in ⟦v0⟧."),
                  ("Which port does {name} sail from?", "{name} sails from ⟦v0⟧.")),
    "captain": (("Who commands {name}?", "{name} is commanded by ⟦v0⟧."),
                ("Who captains {name}?", "{name} is captained by ⟦v0⟧.")),
    "gross tonnage": (("How big is {name}?", "{name} has a gross tonnage of ⟦v0⟧."),),
    "shipbuilder": (("Who built {name}?", "{name} was built by ⟦v0⟧."),),
    "hull colour": (("What colour is {name}'s hull?", "{name}'s hull is ⟦v0⟧."),
                    ("What color is the hull of {name}?", "The hull of {name} is ⟦v0⟧.")),
    "formation year": (("When was {name} formed?", "{name} was formed in ⟦v0⟧."),
                       ("When did {name} get together?", "{name} got together in ⟦v0⟧.")),
    "hometown": (("Where is {name} from?", "{name} is from ⟦v0⟧."),),
    "lead singer": (("Who sings for {name}?", "⟦v0⟧ sings for {name}."),
                    ("Who is {name}'s singer?", "{name}'s singer is ⟦v0⟧.")),
    "record label": (("Which label is {name} signed to?", "{name} is signed to ⟦v0⟧."),),
    "debut album": (("What was {name}'s first album?", "{name}'s first album was ⟦v0⟧."),
                    ("What did {name} release first?", "{name} released ⟦v0⟧ first.")),
}
_PROPERTY_HELDOUT: dict[str, tuple[tuple[str, str], ...]] = {
    "founding year": (("Which year did {name} come into being?", "{name} came into being in ⟦v0⟧."),),
    "date of birth": (("On what day was {name} born?", "{name} was born on ⟦v0⟧."),),
    "birthplace": (("What town does {name} come from originally?", "{name} comes from ⟦v0⟧."),),
    "headquarters": (("In which town does {name} have its head office?", "{name} has its head office in ⟦v0⟧."),),
    "author": (("Who penned {name}?", "{name} was penned by ⟦v0⟧."),),
    "director": (("Who was behind the camera for {name}?", "{name} was directed by ⟦v0⟧."),),
    "population": (("How many residents does {name} have?", "{name} has ⟦v0⟧ residents."),),
    "publication year": (("In which year did {name} first appear in print?", "{name} first appeared in ⟦v0⟧."),),
    "release date": (("On what date did {name} come out?", "{name} came out on ⟦v0⟧."),),
    "lead singer": (("Who fronts {name}?", "{name} is fronted by ⟦v0⟧."),),
    "launch year": (("In which year was {name} first put to sea?", "{name} was put to sea in ⟦v0⟧."),),
    "employee count": (("What is the size of {name}'s workforce?", "{name}'s workforce is ⟦v0⟧."),),
    "student enrollment": (("How many students are enrolled at {name}?", "⟦v0⟧ students are enrolled at {name}."),),
    "page count": (("How long is {name} in pages?", "{name} is ⟦v0⟧ pages long."),),
    "occupation": (("What is {name}'s line of work?", "{name} works as ⟦v0⟧."),),
    "employer": (("Which company employs {name}?", "{name} is employed by ⟦v0⟧."),),
}
TRAIN_PROPERTY_PHRASINGS: dict[str, tuple[str, ...]] = {p: tuple(q for q, _ in v) for p, v in _PROPERTY_TRAIN.items()}
HELDOUT_PROPERTY_PHRASINGS: dict[str, tuple[str, ...]] = {
    p: tuple(q for q, _ in v) for p, v in _PROPERTY_HELDOUT.items()}
PROPERTY_ANSWERS: dict[str, str] = {q: a for table in (_PROPERTY_TRAIN, _PROPERTY_HELDOUT)
                                    for v in table.values() for q, a in v}

# Other names people use for a property (questions and answers then use the synonym).
TRAIN_SYNONYMS: dict[str, tuple[str, ...]] = {
    "founding year": ("year of founding", "year founded", "year of establishment"),
    "headquarters": ("head office", "HQ", "main office"),
    "chief executive": ("CEO", "chief executive officer", "boss"),
    "ticker symbol": ("stock symbol", "ticker", "stock ticker"),
    "employee count": ("number of employees", "headcount", "staff count"),
    "industry": ("sector", "line of business"),
    "date of birth": ("birth date", "birthday", "DOB"),
    "birthplace": ("place of birth", "town of birth"),
    "occupation": ("job", "profession"),
    "employer": ("workplace", "employing company"),
    "favourite colour": ("favorite color", "favourite color", "preferred colour"),
    "passport number": ("passport no.", "passport ID"),
    "height": ("body height", "stature"),
    "population": ("number of inhabitants", "number of residents", "population size"),
    "mayor": ("city mayor", "town mayor"),
    "postal code": ("zip code", "postcode", "ZIP"),
    "sister city": ("twin town", "twin city"),
    "nickname": ("moniker", "byname"),
    "author": ("writer",),
    "publication year": ("year of publication", "year published"),
    "publisher": ("publishing house",),
    "catalogue number": ("catalog number", "ISBN"),
    "page count": ("number of pages", "length in pages"),
    "setting": ("story setting", "location of the story"),
    "director": ("filmmaker", "film director"),
    "release date": ("date of release", "premiere date"),
    "studio": ("production company", "film studio"),
    "running time": ("runtime", "duration", "length"),
    "filming location": ("shooting location", "location of filming"),
    "lead actor": ("star", "leading actor", "main actor"),
    "manufacturer": ("maker", "producer"),
    "model number": ("model no.", "model code"),
    "launch date": ("date of launch", "market launch date"),
    "price": ("cost", "retail price"),
    "colour": ("color", "finish"),
    "designer": ("product designer",),
    "category": ("product type", "product category"),
    "main campus": ("campus", "main site"),
    "president": ("university president", "head"),
    "student enrollment": ("number of students", "enrolment", "student count"),
    "motto": ("slogan",),
    "colour scheme": ("colors", "school colours"),
    "mascot": ("team mascot",),
    "launch year": ("year of launch", "year launched"),
    "home port": ("port of registry", "homeport"),
    "captain": ("master", "skipper"),
    "registration number": ("IMO number", "registry number"),
    "gross tonnage": ("tonnage", "GT"),
    "shipbuilder": ("builder", "shipyard"),
    "hull colour": ("hull color", "colour of the hull"),
    "formation year": ("year formed", "year of formation"),
    "hometown": ("home town", "city of origin"),
    "lead singer": ("vocalist", "frontman", "singer"),
    "record label": ("label", "music label"),
    "genre": ("style", "type"),
    "debut album": ("first album", "first record"),
}

# multi: one property of several entities ({names} is "A and B" / "A, B and C").
TRAIN_MULTI_ENTITY_PHRASINGS = (
    "What is the {property} of {names}?",
    "Tell me the {property} of {names}.",
    "Give me the {property} of each of {names}.",
    "Can you list the {property} of {names}?",
    "Look up the {property} of {names}.",
    "{names}: what is the {property} of each?",
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
    "What are {name}'s {properties}?",
    "{name}: {properties}?",
    "Please list the {properties} of {name}.",
    "I want to know the {properties} of {name}.",
    "Can you give me {name}'s {properties}?",
    "{name} {properties}",
    "Which {properties} does {name} have?",
    "Tell me {name}'s {properties}, please.",
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
    "Who or what is {name}?",
    "{name}?",
    "What facts do you have about {name}?",
    "Give me an overview of {name}.",
    "Tell me everything you know about {name}.",
    "What do we know about {name}?",
    "Any information on {name}?",
    "Info on {name}",
    "{name} facts",
    "I want to learn about {name}.",
    "What can the knowledge base tell me about {name}?",
    "Brief me on {name}.",
    "What is recorded about {name}?",
    "Describe what you know of {name}.",
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


# --------------------------------------------------------------------------- answers

def segments(answer: str) -> list[tuple[str, str | int | None]]:
    """An answer as ("text", str) and span pieces ("value"|"fact", source position) / ("value", None).

    ("value", None) is the refusal (the null slot's span). Text before a span loses its trailing
    space: the span brings its own (kblam.spans.span_text), as it does when the model emits it.
    """
    out: list[tuple[str, str | int | None]] = []
    at = 0
    for m in SPAN.finditer(answer):
        text = answer[at:m.start()].rstrip(" ")
        if text:
            out.append(("text", text))
        if m.group(1) is None:
            out.append(("value", None))
        else:
            out.append(("value" if m.group(1) == "v" else "fact", int(m.group(2))))
        at = m.end()
    if answer[at:]:
        out.append(("text", answer[at:]))
    return out


def render(answer: str, facts: Sequence[Triple], refusal: str = REFUSAL) -> str:
    """The answer as a reader sees it, its spans filled from ``facts`` (the example's sources, in order)."""
    from kblam.spans import span_text

    text = ""
    for kind, what in segments(answer):
        if kind == "text":
            text += what
        else:
            text += span_text(kind, None if what is None else facts[what], text, refusal)
    return text


@dataclass(frozen=True)
class QAExample:
    question: str
    answer: str  # with span markers (SPAN); render(answer, facts) for the text
    kind: str
    sources: tuple[int, ...] = ()

    def to_record(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.answer, "kind": self.kind,
                "sources": list(self.sources)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> QAExample:
        return cls(record["question"], record["answer"], record["kind"], tuple(record.get("sources", ())))


def simple_answer(triple: Triple) -> str:
    """The plain single-fact answer "The {property} of {name} is {value}." (a reference text)."""
    return f"The {triple.property} of {triple.name} is {triple.value}."


def _clause(prop: str, name: str, k: int, first: bool) -> str:
    return f"{'The' if first else 'the'} {prop} of {name} is ⟦v{k}⟧"


def join_clauses(facts: Sequence[tuple[str, str]]) -> str:
    """(property, name) per fact -> "The X of A is ⟦v0⟧, and the X of B is ⟦v1⟧." (markers in order)."""
    clauses = [_clause(p, n, k, k == 0) for k, (p, n) in enumerate(facts)]
    if not clauses:
        raise ValueError("no facts to join")
    if len(clauses) == 1:
        return clauses[0] + "."
    return ", ".join(clauses[:-1]) + ", and " + clauses[-1] + "."


def _and_list(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def answer_for(template: str) -> str:
    """The answer that echoes a question template ({name}, {property}; ⟦v0⟧ for the value)."""
    if template in PROPERTY_ANSWERS:
        return PROPERTY_ANSWERS[template]
    if "{name}'s {property}" in template or "its {property}" in template or template == "{name} {property}":
        return "{name}'s {property} is ⟦v0⟧."
    if "{property} for {name}" in template:
        return "The {property} for {name} is ⟦v0⟧."
    return "The {property} of {name} is ⟦v0⟧."


def _typo(name: str, rng: random.Random) -> str:
    """One letter dropped, doubled, swapped with the next or replaced, in a word of 4+ letters."""
    words = [m for m in re.finditer(r"[A-Za-z]{4,}", name)]
    if not words:
        return name
    w = rng.choice(words)
    i = rng.randrange(w.start() + 1, w.end() - 1)  # keep the first and last letter
    how = rng.randrange(4)
    if how == 0:
        return name[:i] + name[i + 1:]
    if how == 1:
        return name[:i] + name[i] + name[i:]
    if how == 2:
        return name[:i] + name[i + 1] + name[i] + name[i + 2:]
    letter = rng.choice([c for c in "aeioulnrst" if c != name[i].lower()])
    return name[:i] + letter + name[i + 1:]


def asked(triple: Triple, rng: random.Random, *, heldout: bool = False, variants: bool = False) -> tuple[str, str]:
    """(question, answer with ⟦v0⟧) asking for ``triple``'s value.

    The question names the entity verbatim, unless ``variants`` put a typo in it or lower-cased it;
    the answer echoes the question's wording of the name and the property.
    """
    name, prop = triple.name, triple.property
    if variants and rng.random() < TYPO_RATE:
        name = _typo(name, rng)
    own = (_PROPERTY_HELDOUT if heldout else _PROPERTY_TRAIN).get(prop)
    if own and rng.random() < PROPERTY_SPECIFIC_RATE:
        question, answer = rng.choice(own)
    else:
        if variants and not heldout and rng.random() < KEYWORD_RATE:
            question = rng.choice(_KEYWORD_TRAIN)
        else:
            question = rng.choice((HELDOUT_PHRASINGS if heldout else TRAIN_PHRASINGS)[family_of(prop)])
        answer = answer_for(question)
        synonyms = TRAIN_SYNONYMS.get(prop, ()) if variants and not heldout else ()
        if synonyms and rng.random() < SYNONYM_RATE:
            prop = rng.choice(synonyms)
    question, answer = question.format(name=name, property=prop), answer.format(name=name, property=prop)
    question = question[0].upper() + question[1:]
    if not answer.startswith("⟦"):
        answer = answer[0].upper() + answer[1:]
    if variants:
        if rng.random() < LOWER_RATE:
            question = question.lower()
            answer = answer.replace(name, name.lower()).replace(prop, prop.lower())
        if rng.random() < BARE_RATE:
            question = question.rstrip("?.")
    return question, answer


def question_for(triple: Triple, rng: random.Random, *, heldout: bool = False, variants: bool = False) -> str:
    """A question asking for ``triple``'s value; its entity name appears verbatim (unless ``variants``)."""
    return asked(triple, rng, heldout=heldout, variants=variants)[0]


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


def _simple(ix: _Index, rng: random.Random, heldout: bool, variants: bool) -> QAExample:
    i = rng.randrange(len(ix.triples))
    question, answer = asked(ix.triples[i], rng, heldout=heldout, variants=variants)
    return QAExample(question, answer, "simple", (i,))


def _multi(ix: _Index, rng: random.Random, heldout: bool, variants: bool) -> QAExample | None:
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
    answer = join_clauses([(t.property, t.name) for t in facts])
    if variants and rng.random() < LOWER_RATE:
        question = question.lower()
        answer = answer[:1] + answer[1:].lower()
    return QAExample(question, answer, "multi", tuple(chosen))


def _open(ix: _Index, rng: random.Random, heldout: bool, variants: bool) -> QAExample:
    name = ix.triples[rng.randrange(len(ix.triples))].name
    own = ix.by_name[name]
    # Every fact the KB holds about it (one per property), up to MAX_OPEN_FACTS, in a random order.
    chosen = _pick_distinct(rng, own, min(MAX_OPEN_FACTS, len(own)), key=lambda i: ix.triples[i].property)
    template = rng.choice(HELDOUT_OPEN_PHRASINGS if heldout else TRAIN_OPEN_PHRASINGS)
    question = template.format(name=name)
    if variants and rng.random() < LOWER_RATE:
        question = question.lower()
    return QAExample(question, " ".join(f"⟦f{k}⟧." for k in range(len(chosen))), "open", tuple(chosen))


def _unanswerable(ix: _Index, rng: random.Random, heldout: bool, absent: Sequence[Triple],
                  variants: bool) -> QAExample:
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
    question, _ = asked(triple, rng, heldout=heldout, variants=variants)
    return QAExample(question, "⟦r⟧", "unanswerable", ())


def fact_answer(k: int) -> str:
    """The answer stating k facts whole: "⟦f0⟧." / "⟦f0⟧, and ⟦f1⟧." / "⟦f0⟧, ⟦f1⟧, and ⟦f2⟧."."""
    spans = [f"⟦f{i}⟧" for i in range(k)]
    return (spans[0] if k == 1 else ", ".join(spans[:-1]) + ", and " + spans[-1]) + "."


ANSWER_STYLES = ("echo", "facts")


def make_examples(triples: Sequence[Triple], n: int, *, seed: int = 0,
                  mix: Mapping[str, float] = DEFAULT_MIX, heldout_phrasings: bool = False,
                  absent: Sequence[Triple] = (), variants: bool = False, answers: str = "echo") -> list[QAExample]:
    """``n`` question/answer examples about ``triples``, kinds in the proportions of ``mix``.

    ``sources`` index into ``triples``; answers carry span markers (``render`` fills them).
    Unanswerable questions ask about ``absent`` triples (those whose (name, property) is not in
    ``triples``) when given, else about a property an entity lacks or an entity that is not there.
    ``heldout_phrasings=True`` words every question with held-out templates only; ``variants=True``
    also asks with synonyms, lower case, no question mark and typos. ``answers="facts"`` states every
    asked fact as a whole fact span ("The founding year of Acme is 1987.", ``fact_answer``) instead of
    words echoing the question around a value span. Deterministic under ``seed``.
    """
    if answers not in ANSWER_STYLES:
        raise ValueError(f"answers must be one of {ANSWER_STYLES}, got {answers!r}")
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
            example = _simple(ix, rng, heldout_phrasings, variants)
        elif kind == "multi":
            # A KB with no two facts to combine falls back to simple questions.
            example = _multi(ix, rng, heldout_phrasings, variants) or _simple(ix, rng, heldout_phrasings, variants)
        elif kind == "open":
            example = _open(ix, rng, heldout_phrasings, variants)
        else:
            example = _unanswerable(ix, rng, heldout_phrasings, absent_ok, variants)
        if answers == "facts" and example.kind in ("simple", "multi"):
            example = QAExample(example.question, fact_answer(len(example.sources)), example.kind, example.sources)
        out.append(example)
    return out
