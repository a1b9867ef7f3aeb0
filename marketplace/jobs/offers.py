"""Offer search: a small query language over units with free capacity, compiled to ORM filters.

A query is a list of clauses joined by spaces, each ``field operator value``, in the spirit of
Vast.ai's search language::

    gpu_name in [H100,B200] num_gpus>=2 gpu_ram>=80 country in [DE,FR] jurisdiction=EU
    verified=true isolation>=gpu price_per_gpu_hour<=2.5 reliability>0.98

Operators are ``= != < <= > >= in notin``; ``in`` and ``notin`` take a list ``[a,b]``. The same
clauses come as plain query parameters (``?gpu_name=H100&num_gpus__gte=2``). Nothing is ever
evaluated: each clause becomes a ``Q`` on a known expression, and a bad one is a ``QueryError``
naming its token and that token's position (a character offset from 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

from django.db.models import Count, Exists, F, IntegerField, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce

from marketplace.jobs import jurisdictions
from marketplace.jobs.models import OfferSnapshot
from marketplace.jobs.placement import cuda_tuple
from marketplace.jobs.units import slices_free
from marketplace.kernel.numbers import decimal_parse, int_parse
from nodes.models import GPU, Isolation, Unit

COMPARE = {"=": "exact", "<": "lt", "<=": "lte", ">": "gt", ">=": "gte"}
OPERATORS = ("=", "!=", "<", "<=", ">", ">=", "in", "notin")
# Plain query parameters: ``field`` is ``=``, ``field__<suffix>`` the operator below.
SUFFIXES = {"ne": "!=", "lt": "<", "lte": "<=", "gt": ">", "gte": ">=", "in": "in", "notin": "notin"}
EQUALITY = ("=", "!=", "in", "notin")
MICROS = Decimal(1_000_000)
# Bounds of the numbers a query may hold (kernel.numbers checks them before any arithmetic).
MAX_GPUS, MAX_GPU_RAM_GB, MAX_PRICE = 10_000, 100_000, 1_000_000


class QueryError(ValueError):
    def __init__(self, message: str, token: str, position: int, param: str = ""):
        where = f"in parameter {param}" if param else f"at position {position}"
        super().__init__(f"{message} {where} ('{token}')")
        self.token, self.position, self.param = token, position, param


@dataclass(frozen=True)
class Clause:
    field: str
    op: str
    values: tuple  # one value, or a list's values, already converted
    position: int


# Fields: (the queryset expression, the operators allowed, a converter from the token's text).
# A converter raises ValueError for a bad value; numbers are bounded (kernel.numbers).


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false"):
        raise ValueError(f"'{text}' is not true or false")
    return lowered == "true"


def _country(text: str) -> str:
    code = jurisdictions.ALIASES.get(text.upper(), text.upper())
    if len(code) != 2 or jurisdictions.normalise([code]) != [code]:
        raise ValueError(f"'{text}' is not an ISO 3166-1 country code")
    return code


def _isolation(text: str) -> str:
    if text.lower() not in Isolation.values:
        raise ValueError(f"'{text}' is not an isolation level ({', '.join(Isolation.values)})")
    return text.lower()


def _cuda(text: str) -> tuple[int, ...]:
    version = cuda_tuple(text)
    if not version or ".".join(map(str, version)) != text:
        raise ValueError(f"'{text}' is not a CUDA version such as 12.4")
    return version


def _gigabytes(text: str) -> int:
    return int(decimal_parse(text, minimum=0, maximum=MAX_GPU_RAM_GB, places=3) * 1024)  # vs the GPU's vram_mb


def _micros(text: str) -> int:
    return int(decimal_parse(text, minimum=0, maximum=MAX_PRICE, places=6) * MICROS)


def _count(text: str) -> int:
    return int_parse(text, minimum=0, maximum=MAX_GPUS)


def _share(text: str) -> float:
    return float(decimal_parse(text, minimum=0, maximum=1))


def _jurisdiction(text: str) -> tuple[str, ...]:
    try:
        return tuple(jurisdictions.normalise([text]))
    except ValueError as error:
        raise ValueError(str(error).rstrip(".")) from None


ALL = OPERATORS
FIELDS = {
    "gpu_name": ("gpu_model", ALL, str),
    "num_gpus": ("free_gpus", ALL, _count),
    "gpu_ram": ("vram_mb", ALL, _gigabytes),  # the offer's GPU's, like gpu_name and cuda
    "country": ("country", EQUALITY, _country),
    "subdivision": ("subdivision", EQUALITY, str.upper),
    "jurisdiction": (None, EQUALITY, _jurisdiction),
    "verified": ("location_verified", ("=", "!="), _boolean),
    "isolation": (None, ALL, _isolation),
    "price_per_gpu_hour": ("price_per_gpu_hour_micros", ALL, _micros),
    "reliability": ("reliability", ALL, _share),
    "cuda": (None, ALL, _cuda),
    "unit": ("name", EQUALITY, str),
}
# sort=<name> or -<name>; ties are broken by the unit id so pages never overlap or skip.
SORTS = {
    "price_per_gpu_hour": "price_per_gpu_hour_micros",
    "reliability": "reliability",
    "num_gpus": "free_gpus",
    "gpu_ram": "vram_mb",
    "gpu_name": "gpu_model",
    "country": "country",
    "unit": "name",
    "verified": "location_verified",
}

# The tokenizer: lists, operator characters, words. Anything else is an unexpected character.
_TOKEN = re.compile(r"(?P<space>\s+)|(?P<op>[<>=!~]+)|(?P<open>\[)|(?P<close>\])|(?P<comma>,)|(?P<word>[\w.+\-:]+)")


def _tokens(text: str) -> list[tuple[str, str, int]]:
    found, position = [], 0
    while position < len(text):
        matched = _TOKEN.match(text, position)
        if matched is None:
            raise QueryError("Unexpected character", text[position], position)
        if matched.lastgroup != "space":
            found.append((matched.lastgroup, matched.group(), position))
        position = matched.end()
    return found


def parse(text: str) -> list[Clause]:
    tokens, clauses, i = _tokens(text), [], 0
    end = ("end", "", len(text))

    def at(index: int):
        return tokens[index] if index < len(tokens) else end

    while i < len(tokens):
        kind, field, position = tokens[i]
        if kind != "word" or field not in FIELDS:
            known = ", ".join(FIELDS)
            raise QueryError(f"Unknown field; use one of {known}", field, position)
        kind, op, op_at = at(i + 1)
        if kind not in ("op", "word") or op not in OPERATORS:
            what = "Missing operator" if kind == "end" else "Bad operator"
            raise QueryError(f"{what} after {field}; use one of {' '.join(OPERATORS)}", op, op_at)
        i += 2
        if op in ("in", "notin"):
            _, opened, opened_at = at(i)
            if opened != "[":
                raise QueryError(f"'{op}' takes a list such as [A,B]", opened, opened_at)
            words, i = [], i + 1
            while True:
                kind, word, word_at = at(i)
                if kind == "end":
                    raise QueryError("Unclosed list", "[", opened_at)
                if kind == "word":
                    words.append((word, word_at))
                elif kind != "comma" and kind != "close":
                    raise QueryError("Unexpected token in list", word, word_at)
                i += 1
                if kind == "close":
                    break
            if not words:
                raise QueryError("Empty list", "[", opened_at)
        else:
            kind, word, word_at = at(i)
            if kind != "word":
                raise QueryError(f"Missing value after {field}{op}", word, word_at)
            words, i = [(word, word_at)], i + 1
        clauses.append(clause_make(field, op, words, position))
    return clauses


def clause_make(field: str, op: str, words: list[tuple[str, int]], position: int) -> Clause:
    _, operators, convert = FIELDS[field]
    if op not in operators:
        raise QueryError(f"{field} takes only {' '.join(operators)}", op, position)
    values = []
    for word, word_at in words:
        try:
            values.append(convert(word))
        except ValueError as error:
            raise QueryError(f"Bad value for {field}: {error}", word, word_at) from None
    return Clause(field, op, tuple(values), position)


def parse_params(params) -> list[Clause]:
    """``?gpu_name=H100&num_gpus__gte=2&country__in=DE,FR``: the same clauses as ``q``."""
    clauses = []
    for name, text in params.items():
        field, _, suffix = name.partition("__")
        if field not in FIELDS or (suffix and suffix not in SUFFIXES):
            raise QueryError(f"Unknown parameter; filter on {', '.join(FIELDS)}", name, 0, name)
        op = SUFFIXES[suffix] if suffix else "="
        parts = text.split(",") if op in ("in", "notin") else [text]
        try:
            clauses.append(clause_make(field, op, [(part.strip(), 0) for part in parts], 0))
        except QueryError as error:
            raise QueryError(str(error).rsplit(" at position", 1)[0], error.token, 0, name) from None
    return clauses


# Compiling


def _compare(expression: str, op: str, values: tuple) -> Q:
    if op == "in":
        return Q(**{f"{expression}__in": values})
    if op == "notin":
        return ~Q(**{f"{expression}__in": values})
    if op == "!=":
        return ~Q(**{expression: values[0]})
    return Q(**{f"{expression}__{COMPARE[op]}": values[0]})


def _holds(op: str, left, values: tuple) -> bool:
    if op == "in":
        return left in values
    if op == "notin":
        return left not in values
    right = values[0]
    return {"=": left == right, "!=": left != right, "<": left < right, "<=": left <= right,
            ">": left > right, ">=": left >= right}[op]  # fmt: skip


def _jurisdiction_q(clause: Clause) -> Q:
    """Admitted exactly as placement admits a job's codes: through ``jurisdictions.match``."""
    places = Unit.objects.filter(status=Unit.Status.ONLINE).order_by().values_list("country", "subdivision")
    codes = tuple(sorted({code for value in clause.values for code in value}))
    admitted = Q(pk__in=[])
    for country, subdivision in places.distinct():
        if jurisdictions.match(codes, country, subdivision):
            admitted |= Q(country=country, subdivision=subdivision)
    return ~admitted if clause.op in ("!=", "notin") else admitted


def _isolation_q(clause: Clause) -> Q:
    values = clause.values
    if clause.op in ("<", "<=", ">", ">="):
        ranked = [(Isolation.rank(level), level) for level in Isolation.values]
        values = tuple(level for rank, level in ranked if _holds(clause.op, rank, (Isolation.rank(values[0]),)))
    # JSON text containment of '"gpu"': a list of level names, so it cannot match by accident.
    offers = Q(pk__in=[])
    for level in values:
        offers |= Q(isolation_levels__icontains=level)
    return ~offers if clause.op in ("!=", "notin") else offers


def _cuda_q(clause: Clause) -> Q:
    known = OfferSnapshot.objects.order_by().values_list("cuda_version", flat=True).distinct()
    versions = [version for version in known if _holds(clause.op, cuda_tuple(version), clause.values)]
    return Q(cuda__in=versions)


def compile_clauses(clauses: list[Clause]) -> Q:
    where = Q()
    for clause in clauses:
        expression = FIELDS[clause.field][0]
        if clause.field == "jurisdiction":
            where &= _jurisdiction_q(clause)
        elif clause.field == "isolation":
            where &= _isolation_q(clause)
        elif clause.field == "cuda":
            where &= _cuda_q(clause)
        else:
            where &= _compare(expression, clause.op, clause.values)
    return where


# The offers


def free_gpus() -> QuerySet:
    """GPUs placement could lease now: present, healthy, with an advertised slice not leased.

    Read from the GPU side, so the partial index on usable GPUs answers "the unit's first free
    GPU" without touching every slice of every unit."""
    free = slices_free().filter(gpu=OuterRef("pk"))
    return GPU.objects.filter(present=True, healthy=True).filter(Exists(free))


def snapshots_refresh() -> int:
    """Recompute the offer snapshot of every online unit whose capacity version moved since its
    snapshot was taken (or that has none); return how many were recomputed.

    The version and the free GPUs are read in one statement, so a snapshot is always consistent
    with the version it records; a change committed meanwhile bumps the version again and the
    next search recomputes that unit. When nothing changed this is one join of two narrow tables."""
    stale = list(
        Unit.objects.filter(status=Unit.Status.ONLINE)
        .annotate(seen=F("offer__version"))
        .filter(Q(seen__isnull=True) | ~Q(seen=F("capacity_version")))
        .values_list("pk", flat=True)
    )
    if not stale:
        return 0
    # Asked apart from the check: the correlated subqueries' estimate over every online unit
    # would have PostgreSQL JIT-compile the check (~200 ms) even when nothing is stale.
    mine = free_gpus().filter(unit=OuterRef("pk")).order_by()
    first = mine.order_by("index")
    count = mine.values("unit").annotate(n=Count("pk")).values("n")
    rows = (
        Unit.objects.filter(pk__in=stale)
        .annotate(
            gpu_model=Subquery(first.values("model")[:1]),
            vram_mb=Subquery(first.values("vram_mb")[:1]),
            cuda=Subquery(first.values("cuda_version")[:1]),
            free_gpus=Coalesce(Subquery(count, output_field=IntegerField()), Value(0)),
        )
        .order_by("pk")  # upserts lock rows in key order, so concurrent refreshes never deadlock
        .values_list("pk", "capacity_version", "free_gpus", "gpu_model", "vram_mb", "cuda")
    )
    snapshots = [
        OfferSnapshot(unit_id=unit_id, version=version, free_gpus=free, gpu_model=model or "", vram_mb=vram,
                      cuda_version=cuda or "")
        for unit_id, version, free, model, vram, cuda in rows
    ]  # fmt: skip
    OfferSnapshot.objects.bulk_create(
        snapshots,
        update_conflicts=True,
        unique_fields=["unit"],
        update_fields=["version", "free_gpus", "gpu_model", "vram_mb", "cuda_version"],
    )
    return len(snapshots)


def offers() -> QuerySet:
    """One row per online unit with a free GPU, annotated with what the offer shows, from the
    units' offer snapshots (call ``snapshots_refresh`` first).

    GPU model, VRAM and CUDA version are those of the unit's first free GPU (by index), and the
    GPU filters look at that GPU: units are sold as one model in practice, and a mixed unit
    offers its first free model."""
    return (
        # A unit under review takes no new job, so it offers none.
        Unit.objects.filter(status=Unit.Status.ONLINE, review_since__isnull=True, offer__free_gpus__gt=0)
        .annotate(
            gpu_model=F("offer__gpu_model"),
            vram_mb=F("offer__vram_mb"),
            cuda=F("offer__cuda_version"),
            free_gpus=F("offer__free_gpus"),
        )
        .only(
            "id",
            "name",
            "country",
            "subdivision",
            "location_verified",
            "isolation_levels",
            "price_per_gpu_hour_micros",
            "reliability",
            "limits",
        )  # fmt: skip
    )


def search(clauses: list[Clause]) -> QuerySet:
    snapshots_refresh()
    return offers().filter(compile_clauses(clauses))
