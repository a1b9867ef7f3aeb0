"""The places a job may run: ISO 3166-1 countries, ISO 3166-2 subdivisions and named sets.

Countries and subdivisions (with their hierarchy: FR-75C Paris lies in FR-IDF Île-de-France)
come from pycountry, which ships the Debian iso-codes tables. A job's codes are stored as
``normalise`` returns them; placement asks ``match`` which code admits a unit, and the answer
goes into the placement record.
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache

import pycountry

# Membership of the named sets. No maintained, light package ships these (pyeucountrycodes has
# the EU alone; country_converter pulls in pandas), so they are data here. Sources, checked
# 2025-06: EU member states, europa.eu "EU countries" (27 since the UK left on 2020-02-01);
# EEA = EU + Iceland, Liechtenstein, Norway, and EFTA = those three + Switzerland, efta.int.
# Only sovereign member states are listed: territories with an ISO code of their own (French
# Guiana GF, Åland AX, the Faroes FO, …) are in no set, and a job that wants them names them.
# A set that admits too little costs capacity; one that admitted too much would break residency.
_EU = frozenset({
    "AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU",
    "IE", "IT", "LT", "LU", "LV", "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK",
})  # fmt: skip
_EFTA = frozenset({"CH", "IS", "LI", "NO"})
NAMED_SETS: dict[str, tuple[str, frozenset[str]]] = {
    "EU": ("European Union", _EU),
    "EEA": ("European Economic Area", _EU | {"IS", "LI", "NO"}),
    "EFTA": ("European Free Trade Association", _EFTA),
    "DACH": ("Germany, Austria and Switzerland", frozenset({"DE", "AT", "CH"})),
}

# Common spellings that are not ISO 3166 codes, and the ISO code they mean.
ALIASES = {"UK": "GB"}

# "+" joins codes into one: "EU+EEA+CH" is stored as its parts, CH, EEA and EU.
JOIN = "+"


def _parts(code: str) -> list[str]:
    return [ALIASES.get(part, part) for part in (p.strip() for p in code.upper().split(JOIN))]


def _is_known(code: str) -> bool:
    if code in NAMED_SETS:
        return True
    if "-" in code:
        return pycountry.subdivisions.get(code=code) is not None
    return len(code) == 2 and pycountry.countries.get(alpha_2=code) is not None


def normalise(codes: list[str]) -> list[str]:
    """Canonical codes, de-duplicated and sorted; ValueError naming every code that is not known.

    Case and surrounding spaces do not matter, "UK" means GB, and "EU+EEA+CH" means EU, EEA, CH.
    """
    if isinstance(codes, str) or not all(isinstance(code, str) for code in codes):
        raise ValueError("Jurisdictions must be a list of codes such as DE, DE-BY or EU.")
    canonical = {part for code in codes for part in _parts(code)}
    if "" in canonical:
        # A blank code must not quietly become "anywhere".
        raise ValueError("A jurisdiction code is empty; name countries such as DE, DE-BY or EU.")
    unknown = sorted(code for code in canonical if not _is_known(code))
    if unknown:
        raise ValueError(
            f"Unknown jurisdiction code{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}. "
            "Use ISO 3166-1 countries (DE), ISO 3166-2 subdivisions (DE-BY) "
            f"or a named set ({', '.join(sorted(NAMED_SETS))})."
        )
    return sorted(canonical)


@lru_cache(maxsize=1)
def _children() -> dict[str, tuple[str, ...]]:
    children: dict[str, list[str]] = defaultdict(list)
    for subdivision in pycountry.subdivisions:
        if subdivision.parent_code:
            children[subdivision.parent_code].append(subdivision.code)
    return {parent: tuple(codes) for parent, codes in children.items()}


def _within(subdivision: str) -> list[str]:
    """A subdivision and every subdivision inside it."""
    found, todo = [], [subdivision]
    while todo:
        code = todo.pop()
        found.append(code)
        todo.extend(_children().get(code, ()))
    return found


def _specificity(code: str) -> tuple:
    return ("-" not in code, code in NAMED_SETS, code)


@lru_cache(maxsize=4096)
def _admitters(codes: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """For one job's codes: subdivision -> the code admitting it, country -> the code admitting it.

    The narrowest code wins, so the placement record names the most specific rule that held.
    """
    by_subdivision: dict[str, str] = {}
    by_country: dict[str, str] = {}
    for code in sorted(codes, key=_specificity):
        if "-" in code:
            for inner in _within(code):
                by_subdivision.setdefault(inner, code)
        elif code in NAMED_SETS:
            for country in NAMED_SETS[code][1]:
                by_country.setdefault(country, code)
        else:
            by_country.setdefault(code, code)
    return by_subdivision, by_country


def match(codes: list[str] | tuple[str, ...], country: str, subdivision: str) -> str | None:
    """The code in ``codes`` that admits a unit at (country, subdivision), or None.

    A country admits all of its subdivisions; a subdivision admits units declaring it or a
    subdivision inside it; a named set admits its member countries. Empty ``codes`` means
    anywhere and returns "".
    """
    if not codes:
        return ""
    by_subdivision, by_country = _admitters(tuple(codes))
    # A subdivision counts only inside the declared country, so a unit in DE that mistakenly
    # declares FR-IDF is never admitted by "FR-IDF".
    if subdivision and subdivision.startswith(f"{country}-") and subdivision in by_subdivision:
        return by_subdivision[subdivision]
    return by_country.get(country)


@lru_cache(maxsize=4096)
def _countries(codes: tuple[str, ...]) -> tuple[str, ...]:
    countries: set[str] = set()
    for code in codes:
        countries |= NAMED_SETS[code][1] if code in NAMED_SETS else {code.split("-", 1)[0]}
    return tuple(sorted(countries))


def countries_of(codes: list[str] | tuple[str, ...]) -> list[str]:
    """Every country the codes can ever admit, sorted; the agent checks its own against these."""
    return list(_countries(tuple(codes)))


@lru_cache(maxsize=1024)
def describe(code: str) -> str:
    """A human name: "EU" -> "European Union", "DE-BY" -> "Bayern (Germany)"."""
    if code in NAMED_SETS:
        return NAMED_SETS[code][0]
    if "-" in code:
        subdivision = pycountry.subdivisions.get(code=code)
        return f"{subdivision.name} ({describe(subdivision.country_code)})" if subdivision else code
    country = pycountry.countries.get(alpha_2=code) if len(code) == 2 else None
    if country is None:
        return code
    return getattr(country, "common_name", None) or country.name
