"""A knowledge base of real facts, built from the ISO 3166 / ISO 4217 tables in ``pycountry``.

Nothing here is written by hand: every triple comes from the data that ``pycountry`` (pinned in
requirements.txt, the ``bench`` extra) ships. ``countries_kb()`` gives, for each of the 249 ISO 3166-1
countries and territories, its "alpha-2 code", "alpha-3 code" and "numeric code" (and its "official
name" where ISO gives one), and for each ISO 4217 currency its "currency code" and "currency number":
about 1,270 triples in a fixed order (countries by alpha-2 code, then currencies by code).

``counterfactual(triples, seed)`` swaps the values among the entities of each property (a seeded random
derangement: no triple keeps its value), for testing whether answers follow the KB or the base model's
memory.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

from kblam.kb import KnowledgeBase, Triple

__all__ = ["COUNTRY_PROPERTIES", "CURRENCY_PROPERTIES", "counterfactual", "countries_kb", "country_triples"]

COUNTRY_PROPERTIES = {"alpha_2": "alpha-2 code", "alpha_3": "alpha-3 code", "numeric": "numeric code",
                      "official_name": "official name"}
CURRENCY_PROPERTIES = {"alpha_3": "currency code", "numeric": "currency number"}


def country_triples(*, currencies: bool = True) -> list[Triple]:
    """ISO 3166-1 countries (and, with currencies=True, ISO 4217 currencies) as triples; deterministic."""
    import pycountry

    triples = []
    for country in sorted(pycountry.countries, key=lambda c: c.alpha_2):
        for attr, prop in COUNTRY_PROPERTIES.items():
            value = getattr(country, attr, None)
            if value:
                triples.append(Triple(country.name, prop, value))
    if currencies:
        country_names = {t.name for t in triples}
        seen = Counter(c.name for c in pycountry.currencies)
        for currency in sorted(pycountry.currencies, key=lambda c: c.alpha_3):
            # A name must stay one entity: currencies sharing a name (two "Bolívar Soberano") are left out.
            if currency.name in country_names or seen[currency.name] > 1:
                continue
            for attr, prop in CURRENCY_PROPERTIES.items():
                value = getattr(currency, attr, None)
                if value:
                    triples.append(Triple(currency.name, prop, value))
    return triples


def countries_kb(*, currencies: bool = True) -> KnowledgeBase:
    """The real-facts KB (``country_triples``) as a KnowledgeBase."""
    return KnowledgeBase(country_triples(currencies=currencies), source="pycountry")


def counterfactual(triples: Sequence[Triple], seed: int = 0, *, strict: bool = True) -> list[Triple]:
    """The same triples with each property's values permuted among its entities, in the same order.

    Within each property the permutation is a derangement of the values: no triple keeps its value
    (Sattolo's algorithm, which draws a random cyclic permutation, from ``random.Random(seed)`` per
    property; redrawn if equal value strings would land on each other). Properties held by a single
    triple cannot be swapped and are left out. A property whose values are mostly one string (the
    country of airports) cannot be deranged either: an error, or with strict=False left out too.
    Deterministic for a given seed.
    """
    by_property: dict[str, list[int]] = {}
    for i, t in enumerate(triples):
        by_property.setdefault(t.property, []).append(i)
    new_values: dict[int, str] = {}
    for prop in sorted(by_property):
        rows = by_property[prop]
        if len(rows) < 2:
            continue
        values = [triples[i].value for i in rows]
        rng = random.Random(f"{seed}:{prop}")
        for _ in range(100):
            order = list(range(len(rows)))
            for i in range(len(order) - 1, 0, -1):  # Sattolo: one cycle through every position
                j = rng.randrange(i)
                order[i], order[j] = order[j], order[i]
            if all(values[order[k]] != values[k] for k in range(len(rows))):
                break
        else:
            if not strict:
                continue
            raise ValueError(f"cannot derange the values of property {prop!r} (too many equal values)")
        for k, i in enumerate(rows):
            new_values[i] = values[order[k]]
    return [Triple(t.name, t.property, new_values[i]) for i, t in enumerate(triples) if i in new_values]
