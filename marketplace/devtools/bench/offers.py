"""Offer search benchmark: a fixed mix of searches through the real view on a scratch PostgreSQL
database of ``--units`` online units, reporting p50/p99 request latency overall and per search.

Requests go through Django's test client with a renter's API key, so authentication, parsing,
the query, serialisation and the cursor are all in the time. The placement benchmark's
``populate`` builds the units; a tenth are then taken offline, a tenth have no GPU advertised
and reliabilities are spread, so filters and sorts have something to skip. Before every search
``--churn`` random units have their capacity changed (their version bumped, as a lease or a
heartbeat would), so each search also pays for recomputing that many offer snapshots.
"""

from __future__ import annotations

import random
import statistics
import time

from django.core.management.base import CommandError
from django.db import connection
from django.test.utils import override_settings
from rest_framework.test import APIClient

from marketplace.devtools.bench.placement import populate, scratch_database

HELP = "p50/p99 latency of offer searches (filters, sorts, pages) through the API, on PostgreSQL."
OFFERS = "/api/v1/offers"
# name -> (query parameters, how many pages to follow through ``next``)
MIX: dict[str, tuple[dict, int]] = {
    "all_by_price": ({}, 3),
    "h100": ({"q": "gpu_name=H100"}, 1),
    "big_gangs": ({"q": "gpu_name in [H100,A100] num_gpus>=8"}, 1),
    "eu_verified": ({"q": "jurisdiction=EU verified=true"}, 3),
    "dach_reliable": ({"q": "jurisdiction=DACH reliability>0.95", "sort": "-reliability"}, 2),
    "cheap_nearby": ({"q": "country in [DE,FR,NL] price_per_gpu_hour<=2", "sort": "-reliability"}, 1),
    "full_example": (
        {
            "q": "gpu_name in [H100,B200] num_gpus>=2 gpu_ram>=80 country in [DE,FR,NL] "
            "jurisdiction=EU verified=true isolation>=gpu price_per_gpu_hour<=2.5 "
            "reliability>0.98"
        },
        1,
    ),  # fmt: skip
    "cuda_recent": ({"q": "cuda>=12.4", "sort": "-price_per_gpu_hour"}, 1),
    "plain_params": ({"gpu_name": "L40S", "country__in": "US,GB"}, 1),
    "no_match": ({"q": "gpu_name=B200"}, 1),
    "by_free_gpus": ({"sort": "-num_gpus"}, 2),
    "by_vram": ({"sort": "-gpu_ram", "limit": "100"}, 1),
    "by_name": ({"sort": "unit", "q": "subdivision=DE-BY"}, 2),
}


def add_arguments(parser) -> None:
    parser.add_argument("--units", type=int, default=10_000)
    parser.add_argument("--gpus-per-unit", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20, help="times each search (and its pages) is run")
    parser.add_argument("--churn", type=int, default=20, help="units whose capacity changes before each search")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--keep-database", action="store_true", help="leave the scratch database for inspection")


def run(**options) -> dict:
    if connection.vendor != "postgresql":
        raise CommandError("bench offers needs PostgreSQL: set DATABASE_URL to a PostgreSQL server.")
    if options["units"] < 1 or options["repeats"] < 1 or options["churn"] < 0:
        raise CommandError("--units and --repeats must be at least 1, --churn at least 0.")
    # The client is the test client's host, and one key asks far faster than a renter may.
    unthrottled = override_settings(ALLOWED_HOSTS=["testserver"], API_RATE_LIMIT="1000000/min")
    with scratch_database(keep=options["keep_database"]), unthrottled:
        rng = random.Random(options["seed"])
        renter = populate(rng, options["units"], options["gpus_per_unit"])
        _vary(options["seed"])
        client = _client(renter)
        timings: dict[str, list[float]] = {name: [] for name in MIX}
        for repeat in range(options["repeats"] + 1):
            for name, (params, pages) in MIX.items():
                for elapsed in _search(client, params, pages, options["churn"]):
                    if repeat:  # the first round warms caches and is not counted
                        timings[name].append(elapsed)
    every = [t for times in timings.values() for t in times]
    return {
        "units": options["units"],
        "churn_per_search": options["churn"],
        "queries": len(every),
        "p50_ms": _percentile(every, 50),
        "p99_ms": _percentile(every, 99),
        "per_query": {
            name: {"p50_ms": _percentile(times, 50), "p99_ms": _percentile(times, 99)}
            for name, times in timings.items()
        },
    }


def _vary(seed: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT setseed(%s)", [(seed % 1000) / 1000])
        cursor.execute("UPDATE nodes_unit SET reliability = 0.85 + random() * 0.15")
        cursor.execute("UPDATE nodes_unit SET status = 'offline' WHERE random() < 0.1")
        cursor.execute(
            "UPDATE nodes_slice SET advertised = false WHERE unit_id IN "
            "(SELECT id FROM nodes_unit WHERE random() < 0.1)"
        )
        cursor.execute("ANALYZE")


def _client(renter) -> APIClient:
    from marketplace.accounts.services import api_key_create

    _, key = api_key_create(user=renter, name="bench")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


def _churn(units: int) -> None:
    if units:
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE nodes_unit SET capacity_version = capacity_version + 1 WHERE id IN "
                "(SELECT id FROM nodes_unit WHERE status = 'online' ORDER BY random() LIMIT %s)",
                [units],
            )


def _search(client: APIClient, params: dict, pages: int, churn: int) -> list[float]:
    timings, url, query = [], OFFERS, params
    for _ in range(pages):
        _churn(churn)
        started = time.perf_counter()
        response = client.get(url, query)
        timings.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200:
            raise CommandError(f"{url} {query} answered {response.status_code}: {response.content[:300]!r}")
        url, query = response.json()["next"], None
        if url is None:
            break
    return timings


def _percentile(values: list[float], percent: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[percent - 1], 2)
