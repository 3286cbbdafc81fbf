"""Real-fact KBs from data packages (kb_builders/real_kbs.py): builds, names, values and wordings.

Fast, no model. A test of a dataset skips when its data package is missing; `make test` installs them
all (requirements.txt).
"""

from __future__ import annotations

import re
import string
from collections import Counter

import pytest

from kb_builders.real_kbs import (
    REAL_KBS,
    RealKB,
    country_display_names,
    real_kb_names,
    real_kb_triples,
)

# The advertised minimum sizes (triples): the two large test sets must allow 10,000-triple KBs with
# entities left out as "absent" near misses.
MIN_TRIPLES = {"countries": 1200, "us_states": 300, "elements": 500, "airports": 12000, "cities": 12000}
MIN_ENTITIES = {"countries": 249, "us_states": 56, "elements": 118, "airports": 5000, "cities": 10000}


def _require(name: str) -> RealKB:
    kb = REAL_KBS[name]
    for package in kb.packages:
        pytest.importorskip(package)
    return kb


@pytest.mark.parametrize("name", list(REAL_KBS))
def test_builds_deterministically_with_clean_unique_facts(name):
    kb = _require(name)
    triples = real_kb_triples(name)
    assert kb.build() == triples  # a fresh build gives the same triples in the same order
    assert len(triples) >= MIN_TRIPLES[name]
    pairs = Counter((t.name, t.property) for t in triples)
    assert max(pairs.values()) == 1, [p for p, c in pairs.items() if c > 1][:5]
    for t in triples:
        assert t.value.strip() == t.value and t.value, t
        assert t.value not in {"None", "nan", "NaN", "null"}, t  # ("NAN" is Nadi airport's IATA code)
        assert "  " not in t.value and "  " not in t.name, t
    # One name, one entity: no two entity names differ only in case.
    names = {t.name for t in triples}
    assert len({n.casefold() for n in names}) == len(names)
    assert len(names) >= MIN_ENTITIES[name]
    # The properties are exactly those the dataset has wordings for.
    assert {t.property for t in triples} == set(kb.wordings)


def test_real_kb_triples_is_cached_but_returns_a_fresh_list():
    _require("us_states")
    first = real_kb_triples("us_states")
    first.clear()
    assert real_kb_triples("us_states")
    with pytest.raises(KeyError, match="unknown real-fact KB"):
        real_kb_triples("planets")


def _formats_with_name_only(template: str) -> bool:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    return fields == ["name"]


@pytest.mark.parametrize("name", list(REAL_KBS))
def test_wordings(name):
    kb = REAL_KBS[name]
    assert kb.role in ("validation", "test")
    assert set(kb.property_phrases) == set(kb.wordings)
    assert all(phrase.strip() for phrase in kb.property_phrases.values())
    seen = Counter()
    for prop, templates in kb.wordings.items():
        assert 6 <= len(templates) <= 10, (prop, len(templates))
        assert len(set(templates)) == len(templates), prop
        for template in templates:
            assert _formats_with_name_only(template), template
            assert template.format(name="Xyz").count("Xyz") == 1
        # Some are typed as users type: no question mark (terse keywords, lower case).
        assert any(not t.rstrip().endswith("?") for t in templates), prop
        seen.update(templates)
    assert max(seen.values()) == 1, "a wording is listed under two properties"
    # Absent properties: 3-6 per dataset, 3-5 wordings each, none a property the KB has.
    assert 3 <= len(kb.absent_wordings) <= 6
    have = {p.casefold() for p in kb.wordings}
    for prop, templates in kb.absent_wordings.items():
        assert prop.casefold() not in have, prop
        assert 3 <= len(templates) <= 5, (prop, len(templates))
        for template in templates:
            assert _formats_with_name_only(template), template
            assert template.format(name="Xyz").count("Xyz") == 1
            assert template not in seen, f"{template!r} is also a wording of a property the KB has"


def test_some_wordings_are_all_lower_case_without_question_mark():
    for kb in REAL_KBS.values():
        lower = [t for ts in kb.wordings.values() for t in ts
                 if t.replace("{name}", "") == t.replace("{name}", "").lower() and "?" not in t]
        assert len(lower) >= len(kb.wordings) // 2, kb.name


def test_roles_and_registry():
    assert real_kb_names("validation") == ("countries", "us_states")
    assert real_kb_names("test") == ("elements", "airports", "cities")
    assert real_kb_names() == tuple(REAL_KBS)
    with pytest.raises(ValueError):
        real_kb_names("train")
    with pytest.raises(ValueError):
        RealKB("x", "train", "x", list, {}, {}, {})
    kb = REAL_KBS["elements"]
    with pytest.raises(TypeError):
        kb.wordings["symbol"] = ()  # read-only


def test_validation_and_test_entities_barely_overlap():
    """Validation and test KBs name different kinds of things; the only shared names are countries or
    US states that are also the name of a city (Singapore, Luxembourg, Washington): the same name, a
    different entity with different properties."""
    for name in REAL_KBS:
        _require(name)
    names = {n: {t.name.casefold() for t in real_kb_triples(n)} for n in REAL_KBS}
    for v in real_kb_names("validation"):
        for t in real_kb_names("test"):
            shared = names[v] & names[t]
            if t != "cities":
                assert not shared, (v, t, sorted(shared)[:5])
            else:
                assert len(shared) <= 40, (v, t, sorted(shared))


def test_spot_values():
    """A few values as a reader expects them (numbers formatted, units attached)."""
    _require("elements")
    facts = {(t.name, t.property): t.value for t in real_kb_triples("elements")}
    assert facts["Beryllium", "atomic mass"] == "9.012"
    assert facts["Iron", "symbol"] == "Fe"
    assert facts["Iron", "atomic number"] == "26"
    assert facts["Iron", "density"] == "7.874 g/cm³"
    assert facts["Iron", "most abundant isotope"] == "Fe-56"
    assert facts["Iron", "crystal structure"] == "body-centered cubic"
    assert ("Hydrogen", "density") not in facts  # the package gives the liquid's, at -252.87 °C
    for t in real_kb_triples("elements"):
        if t.property == "atomic mass":
            assert re.fullmatch(r"\d+(\.\d{1,3})?", t.value), t

    _require("countries")
    facts = {(t.name, t.property): t.value for t in real_kb_triples("countries")}
    assert facts["Germany", "capital"] == "Berlin"
    assert facts["Germany", "alpha-3 code"] == "DEU"
    assert facts["Germany", "calling code"] == "+49"
    assert facts["Germany", "time zone"] == "UTC+01:00"
    assert facts["United States", "currency code"] == "USD"  # not "USD, USN, USS": fund codes dropped
    assert re.fullmatch(r"\d{1,3}(,\d{3})*", facts["Germany", "population"])
    assert facts["Germany", "area"].endswith(" km²")
    assert country_display_names()["KR"] == "South Korea"

    _require("us_states")
    facts = {(t.name, t.property): t.value for t in real_kb_triples("us_states")}
    assert facts["California", "postal abbreviation"] == "CA"
    assert facts["California", "statehood year"] == "1850"
    assert facts["District of Columbia", "political status"] == "federal district"
    assert ("Ohio", "AP abbreviation") not in facts  # AP spells it out

    _require("airports")
    facts = {(t.name, t.property): t.value for t in real_kb_triples("airports")}
    assert facts["London Heathrow Airport", "IATA code"] == "LHR"
    assert facts["London Heathrow Airport", "ICAO code"] == "EGLL"
    assert facts["London Heathrow Airport", "elevation"] == "83 ft"
    assert not any(n == "Newcastle Airport" for n, _ in facts)  # three airports share that name

    _require("cities")
    facts = {(t.name, t.property): t.value for t in real_kb_triples("cities")}
    assert facts["Richmond", "US state"] == "Virginia"  # the most populous of nine Richmonds
    assert facts["Paris", "country code"] == "FR"
    assert facts["Paris", "continent"] == "Europe"


def test_existing_real_facts_kb_is_untouched():
    real_facts = pytest.importorskip("kb_builders.real_facts")
    assert len(real_facts.country_triples()) > 1000
