"""Synthetic KBs (kb_builders.synthetic) and question/answer data (kb_builders.questions). Fast, no models."""

from __future__ import annotations

import collections
import datetime
import json
import os
import random
import re
import subprocess
import sys
from functools import cache, lru_cache

import pytest

from kb_builders import questions as q
from kb_builders.questions import (
    HELDOUT_PHRASINGS,
    REFUSAL,
    TRAIN_PHRASINGS,
    QAExample,
    join_clauses,
    make_examples,
    question_for,
    simple_answer,
)
from kb_builders.synthetic import (
    ENTITY_TYPES,
    FAMILIES,
    property_family,
    split_of,
    synthetic_kb,
    synthetic_triples,
)
from kblam.kb import KnowledgeBase, Triple

ALL_PROPERTIES = {p.name: p.family for et in ENTITY_TYPES.values() for p in et.properties}


@cache
def big() -> tuple[Triple, ...]:
    return tuple(synthetic_triples(20_000, seed=11))


@cache
def small(seed: int = 5, split: str = "train") -> tuple[Triple, ...]:
    return tuple(synthetic_triples(600, seed=seed, split=split))


def entities(triples) -> dict[str, list[Triple]]:
    out: dict[str, list[Triple]] = {}
    for t in triples:
        out.setdefault(t.name, []).append(t)
    return out


# ------------------------------------------------------------------ the generator

def test_entity_types_and_properties_are_well_formed():
    assert len(ENTITY_TYPES) >= 8
    for key, et in ENTITY_TYPES.items():
        assert key == et.name
        assert 4 <= len(et.properties) <= 7, et.name
        names = [p.name for p in et.properties]
        assert len(set(names)) == len(names)
        for spec in et.properties:
            assert spec.name == spec.name.lower().strip() and spec.name
            assert spec.family in FAMILIES
            assert property_family(spec.name) == spec.family
    assert set(ALL_PROPERTIES.values()) == set(FAMILIES)  # every family is used
    with pytest.raises(KeyError, match="not a synthetic property"):
        property_family("colour of the sky")


def test_deterministic_and_seed_sensitive():
    a = synthetic_triples(300, seed=3)
    assert a == synthetic_triples(300, seed=3)
    b = synthetic_triples(300, seed=4)
    assert a != b
    assert len({t.name for t in a} & {t.name for t in b}) < 30  # not the same entities reshuffled
    assert synthetic_triples(0) == []
    assert synthetic_kb(300, seed=3).triples == tuple(a)


def test_deterministic_across_processes():
    # No dependence on PYTHONHASHSEED (set iteration order) or on any global random state.
    code = ("import hashlib,random;random.seed(99);"
            "from kb_builders.synthetic import synthetic_triples;from kb_builders.questions import make_examples;"
            "t=synthetic_triples(200,seed=8);e=make_examples(t,300,seed=2);"
            "print(hashlib.sha1(repr((t,e)).encode()).hexdigest())")
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_names_and_keys_unique_at_20000_entities_and_every_property_present():
    triples = big()
    by_name = entities(triples)
    assert len(by_name) == 20_000
    keys = [(t.name, t.property) for t in triples]
    assert len(set(keys)) == len(keys)
    prop_sets = {et.property_names: et.name for et in ENTITY_TYPES.values()}
    types_seen = collections.Counter()
    for name, facts in by_name.items():
        props = tuple(t.property for t in facts)
        assert props in prop_sets, (name, props)  # all properties of exactly one type, once each
        types_seen[prop_sets[props]] += 1
    assert set(types_seen) == set(ENTITY_TYPES)  # types are mixed
    assert min(types_seen.values()) > 20_000 / len(ENTITY_TYPES) / 2
    # Grouped by entity: an entity's facts are consecutive.
    order = list(dict.fromkeys(t.name for t in triples))
    assert [t.name for t in triples] == [n for n in order for _ in by_name[n]]
    KnowledgeBase(triples, strict=True)  # no conflicts, no duplicates


def test_values_are_short_varied_and_fit_their_family():
    by_property = collections.defaultdict(list)
    for t in big():
        assert t.value and "\n" not in t.value and "\r" not in t.value and t.value == t.value.strip()
        assert 1 <= len(t.value.split()) <= 6, t
        assert "\n" not in t.name and len(t.name.split()) <= 12
        by_property[t.property].append(t.value)
    assert set(by_property) == set(ALL_PROPERTIES)
    for prop, values in by_property.items():
        family = ALL_PROPERTIES[prop]
        assert len(set(values)) >= min(8, len(values) // 2), prop  # not the same for everyone
        most_common = collections.Counter(values).most_common(1)[0][1]
        assert most_common < 0.35 * len(values), prop
        for v in values[:200]:
            if family == "year":
                assert re.fullmatch(r"1[6-9]\d\d|20[0-2]\d", v), v
            elif family == "date":
                datetime.datetime.strptime(v, "%B %d, %Y")
            elif family == "number":
                assert re.search(r"\d", v), v
            elif family == "code":
                assert re.search(r"\d", v) or v.isupper(), v
            elif family in ("person", "place", "organisation"):
                assert v[0].isupper(), v
    assert any("," in v for v in by_property["population"])  # "4,210" style


def test_entity_types_restrict_the_mix():
    triples = synthetic_triples(200, seed=1, entity_types=["person", "ship"])
    allowed = set(ENTITY_TYPES["person"].property_names) | set(ENTITY_TYPES["ship"].property_names)
    assert {t.property for t in triples} == allowed
    assert {t.property for t in synthetic_triples(50, entity_types=["city"])} == set(
        ENTITY_TYPES["city"].property_names)
    with pytest.raises(ValueError, match="unknown entity type"):
        synthetic_triples(5, entity_types=["dragon"])
    with pytest.raises(ValueError, match="split"):
        synthetic_triples(5, split="validation")


def test_split_of_is_stable_and_about_ten_percent():
    assert split_of("Acme Ltd") == split_of("Acme Ltd")
    names = [f"Entity {i}" for i in range(20_000)]
    share = sum(split_of(n) == "test" for n in names) / len(names)
    assert 0.08 < share < 0.12
    assert {split_of(n) for n in names} == {"train", "test"}


def test_train_and_test_never_share_an_entity():
    trains = [{t.name for t in small(seed, "train")} for seed in (1, 2)]
    tests = [{t.name for t in small(seed, "test")} for seed in (1, 2)]
    for names in trains:
        assert len(names) == 600 and all(split_of(n) == "train" for n in names)
    for names in tests:
        assert len(names) == 600 and all(split_of(n) == "test" for n in names)
    for train in trains:
        for test in tests:
            assert not train & test


# ------------------------------------------------------------------ phrasings

def _family_templates():
    for family in FAMILIES:
        for heldout, table in ((False, TRAIN_PHRASINGS), (True, HELDOUT_PHRASINGS)):
            for template in table[family]:
                yield family, heldout, template


def test_phrasing_counts_and_train_heldout_disjoint():
    assert set(TRAIN_PHRASINGS) == set(HELDOUT_PHRASINGS) == set(FAMILIES)
    for family in FAMILIES:
        train, held = TRAIN_PHRASINGS[family], HELDOUT_PHRASINGS[family]
        assert len(set(train)) >= 15 and len(set(train)) == len(train), family
        assert len(set(held)) >= 5 and len(set(held)) == len(held), family
    all_train = {t for ts in TRAIN_PHRASINGS.values() for t in ts}
    all_train |= {t for ts in q.TRAIN_PROPERTY_PHRASINGS.values() for t in ts}
    all_train |= set(q.TRAIN_OPEN_PHRASINGS + q.TRAIN_MULTI_ENTITY_PHRASINGS + q.TRAIN_MULTI_PROPERTY_PHRASINGS)
    all_held = {t for ts in HELDOUT_PHRASINGS.values() for t in ts}
    all_held |= {t for ts in q.HELDOUT_PROPERTY_PHRASINGS.values() for t in ts}
    all_held |= set(q.HELDOUT_OPEN_PHRASINGS + q.HELDOUT_MULTI_ENTITY_PHRASINGS
                    + q.HELDOUT_MULTI_PROPERTY_PHRASINGS)
    assert not all_train & all_held  # no held-out wording is ever seen in training, in any family
    assert set(q.HELDOUT_PROPERTY_PHRASINGS) <= set(q.TRAIN_PROPERTY_PHRASINGS)
    assert all(q.PROPERTY_ANSWERS[t].count("⟦v0⟧") == 1 for ts in q.TRAIN_PROPERTY_PHRASINGS.values() for t in ts)
    assert set(q.TRAIN_PROPERTY_PHRASINGS) <= set(ALL_PROPERTIES)


def test_every_phrasing_formats_for_every_property_of_its_family():
    for family in ALL_PROPERTIES.values():
        assert TRAIN_PHRASINGS[family] and HELDOUT_PHRASINGS[family]
    for family, _, template in _family_templates():
        assert "{name}" in template and "{property}" in template, template
        for prop in (p for p, f in ALL_PROPERTIES.items() if f == family):
            text = template.format(name="Zyx Corp", property=prop)
            assert "Zyx Corp" in text and prop in text and "{" not in text
            assert text[0].isupper() or text.startswith(("Zyx", prop)), text
            assert text[-1] in "?." or text.endswith(prop), text
    for table in (q.TRAIN_PROPERTY_PHRASINGS, q.HELDOUT_PROPERTY_PHRASINGS):
        for templates in table.values():
            for template in templates:
                assert "Zyx Corp" in template.format(name="Zyx Corp")


def test_question_for_uses_the_right_table_and_contains_the_name():
    rng = random.Random(0)
    for t in small()[:300]:
        for heldout in (False, True):
            question = question_for(t, rng, heldout=heldout)
            assert t.name in question
            parses = {(p, h) for p, h in _parses(question)}
            assert ((t.name, t.property), heldout) in parses, question
            assert ((t.name, t.property), not heldout) not in parses, question


# ------------------------------------------------------------------ examples

def _regex(template: str, prop: str | None) -> re.Pattern:
    props = "|".join(sorted(map(re.escape, ALL_PROPERTIES), key=len, reverse=True))
    parts = re.split(r"(\{name\}|\{property\})", template)
    out = []
    for part in parts:
        if part == "{name}":
            out.append("(?P<name>.+)")
        elif part == "{property}":
            out.append(f"(?P<property>{props})")
        else:
            out.append(re.escape(part))
    return re.compile("^" + "".join(out) + "$", re.IGNORECASE)  # questions start with a capital


@lru_cache(maxsize=1)
def _all_regexes() -> list[tuple[re.Pattern, str | None, bool]]:
    seen: dict[tuple[str, str | None], tuple[re.Pattern, str | None, bool]] = {}
    for _, heldout, template in _family_templates():
        seen[template, None] = (_regex(template, None), None, heldout)
    for heldout, table in ((False, q.TRAIN_PROPERTY_PHRASINGS), (True, q.HELDOUT_PROPERTY_PHRASINGS)):
        for prop, templates in table.items():
            for template in templates:
                seen[template, prop] = (_regex(template, prop), prop, heldout)
    return list(seen.values())


def _parses(question: str):
    """Every ((name, property), heldout) a simple question could be asking, by template."""
    for pattern, prop, heldout in _all_regexes():
        m = pattern.match(question)
        if m:
            yield (m.group("name"), prop or m.group("property").lower()), heldout


def test_simple_multi_open_answers_and_sources():
    triples = small()
    examples = make_examples(triples, 1500, seed=4)
    kinds = collections.Counter(e.kind for e in examples)
    assert set(kinds) == {"simple", "multi", "open", "unanswerable"}
    for e in examples:
        if e.kind == "unanswerable":
            continue
        facts = [triples[i] for i in e.sources]
        assert facts and len(set(e.sources)) == len(e.sources)
        text = q.render(e.answer, facts)
        assert len(q.SPAN.findall(e.answer)) == len(facts)  # every fact is quoted, as a span
        for t in facts:
            assert t.value in text
        if e.kind != "open":
            assert all(t.name in text for t in facts)
        if e.kind == "simple":
            (t,) = facts
            assert e.answer.endswith("⟦v0⟧.") or "⟦v0⟧ " in e.answer, e.answer
            assert t.name in e.question
            assert (t.name, t.property) in {key for key, _ in _parses(e.question)}, e.question
        elif e.kind == "multi":
            assert e.answer == join_clauses([(t.property, t.name) for t in facts])
            assert text.startswith(f"The {facts[0].property} of {facts[0].name} is {facts[0].value}")
            assert 2 <= len(facts) <= 4
            same_property = len({t.property for t in facts}) == 1 and len({t.name for t in facts}) == len(facts)
            same_entity = len({t.name for t in facts}) == 1 and len({t.property for t in facts}) == len(facts)
            assert same_property or same_entity, e
            assert all(t.name in e.question and t.property in e.question for t in facts)
        else:  # open
            (name,) = {t.name for t in facts}
            assert name in e.question
            assert 1 <= len(facts) <= q.MAX_OPEN_FACTS and len({t.property for t in facts}) == len(facts)
            assert text == " ".join(f"The {t.property} of {t.name} is {t.value}." for t in facts)


def test_join_clauses_render_and_simple_answer_form():
    a, b, c = Triple("A", "founding year", "1987"), Triple("B", "founding year", "1990"), Triple("A", "x", "y")
    assert simple_answer(a) == "The founding year of A is 1987."
    pairs = [(t.property, t.name) for t in (a, b, c)]
    assert q.render(join_clauses(pairs[:1]), [a]) == simple_answer(a)
    assert q.render(join_clauses(pairs[:2]), [a, b]) == (
        "The founding year of A is 1987, and the founding year of B is 1990.")
    assert q.render(join_clauses(pairs), [a, b, c]) == (
        "The founding year of A is 1987, the founding year of B is 1990, and the x of A is y.")
    assert q.render("⟦f0⟧. ⟦f1⟧.", [a, c]) == "The founding year of A is 1987. The x of A is y."
    assert q.render("⟦r⟧", []) == REFUSAL
    assert q.segments("It is ⟦v0⟧ now.") == [("text", "It is"), ("value", 0), ("text", " now.")]


def test_unanswerable_questions_are_not_in_the_kb():
    triples = small()
    keys = {(t.name, t.property) for t in triples}
    names = {t.name for t in triples}
    examples = make_examples(triples, 600, seed=1, mix={"unanswerable": 1})
    assert len(examples) == 600 and all(e.kind == "unanswerable" for e in examples)
    ways = collections.Counter()
    for e in examples:
        assert e.answer == "⟦r⟧" and q.render(e.answer, []) == REFUSAL and e.sources == ()
        parses = {key for key, _ in _parses(e.question)}
        assert parses, e.question
        assert not parses & keys, e.question
        ways["known entity" if {n for n, _ in parses} & names else "new entity"] += 1
    assert ways["known entity"] > 100 and ways["new entity"] > 100  # both ways are used


def test_unanswerable_from_absent_and_single_type_kb():
    triples = small()
    absent = small(seed=9, split="test")[:60]
    absent_names = {t.name for t in absent}
    examples = make_examples(triples, 200, seed=2, mix={"unanswerable": 1, "simple": 1}, absent=absent)
    unanswerable = [e for e in examples if e.kind == "unanswerable"]
    assert len(unanswerable) == 100
    for e in unanswerable:
        assert any(n in absent_names for (n, _), _ in _parses(e.question)), e.question
    # A KB of one entity type: "missing property" questions borrow properties of other types.
    people = synthetic_triples(50, seed=3, entity_types=["person"])
    keys = {(t.name, t.property) for t in people}
    for e in make_examples(people, 100, seed=0, mix={"unanswerable": 1}):
        parses = {key for key, _ in _parses(e.question)}
        assert parses and not parses & keys


def test_mix_proportions_and_determinism():
    triples = small()
    for mix in (q.DEFAULT_MIX, {"simple": 0.25, "multi": 0.25, "open": 0.25, "unanswerable": 0.25},
                {"open": 3, "simple": 1}):
        n = 1000
        examples = make_examples(triples, n, seed=7, mix=mix)
        counts = collections.Counter(e.kind for e in examples)
        total = sum(mix.values())
        for kind in q.KINDS:
            assert abs(counts[kind] - n * mix.get(kind, 0) / total) <= 1, (mix, counts)
        assert [e.kind for e in examples[:50]] != sorted(e.kind for e in examples[:50]) or len(counts) == 1
    a = make_examples(triples, 300, seed=1)
    assert a == make_examples(triples, 300, seed=1)
    assert a != make_examples(triples, 300, seed=2)
    assert make_examples(triples, 0) == []
    with pytest.raises(ValueError, match="unknown example kind"):
        make_examples(triples, 5, mix={"simple": 1, "trivia": 1})
    with pytest.raises(ValueError):
        make_examples([], 5)


def test_heldout_phrasings_only():
    triples = small()
    held = make_examples(triples, 800, seed=3, heldout_phrasings=True)
    train = make_examples(triples, 800, seed=3)
    for examples, want in ((held, True), (train, False)):
        for e in examples:
            if e.kind in ("simple", "unanswerable"):
                flags = {h for _, h in _parses(e.question)}
                assert flags == {want}, e.question
    held_open = {e.question for e in held if e.kind == "open"}
    assert held_open and all(any(e.startswith(p.split("{")[0]) for p in q.HELDOUT_OPEN_PHRASINGS)
                             for e in held_open)


def test_records_are_json_and_round_trip():
    examples = make_examples(small(), 50, seed=0)
    records = [e.to_record() for e in examples]
    assert json.loads(json.dumps(records)) == records
    assert set(records[0]) == {"question", "answer", "kind", "sources"}
    assert [QAExample.from_record(r) for r in records] == examples


def test_works_on_tiny_and_non_synthetic_kbs():
    one = [Triple("Iron", "melting point", "1538 °C")]
    examples = make_examples(one, 40, seed=0)
    assert len(examples) == 40
    for e in examples:
        if e.kind != "unanswerable":
            assert e.sources == (0,) and "Iron" in e.question
            if e.kind == "simple":
                assert q.render(e.answer, one) == simple_answer(one[0]) or one[0].value in q.render(e.answer, one)
    assert q.family_of("melting point") == "phrase"
    assert q.family_of("year of birth") == "year"
    assert q.family_of("founder") == "person"
    assert q.family_of("headquarters") == "place"
