"""Offer search: the query language, its errors, sorting and cursor pages, and what an offer shows."""

import pytest

from marketplace.jobs import offers, tasks
from marketplace.jobs.placement import job_place
from marketplace.jobs.services import job_cancel
from nodes.models import GPU, Unit
from nodes.services import unit_heartbeat
from tests.conftest import gpus_make, job_make, problem_of, unit_online

OFFERS = "/api/v1/offers"
# The API key lookup, the offer snapshots' staleness check (nothing changed, so no upsert) and the page.
OFFER_PAGE_QUERIES = 3


def shed(owner, name, *, country="DE", subdivision="", gpus=4, model="H100", vram_mb=81920, cuda="12.4", **policy):
    unit, _ = unit_online(owner, name=name, country=country, gpus=gpus, **policy)
    Unit.objects.filter(pk=unit.pk).update(subdivision=subdivision)
    GPU.objects.filter(unit=unit).update(model=model, vram_mb=vram_mb, cuda_version=cuda)
    return unit


@pytest.fixture
def fleet(owner):
    """Five online units that differ in every field a query can look at."""
    return {
        "berlin": shed(owner, "berlin", subdivision="DE-BE", gpus=8, price_per_gpu_hour_micros=2_500_000,
                       reliability=0.99, location_verified=True, isolation_levels=["gpu", "node"]),
        "paris": shed(owner, "paris", country="FR", gpus=2, model="B200", vram_mb=184320, cuda="12.8",
                      price_per_gpu_hour_micros=3_000_000, reliability=0.95, isolation_levels=["mig", "gpu"]),
        "zurich": shed(owner, "zurich", country="CH", gpus=4, model="A100", vram_mb=40960, cuda="12.2",
                       price_per_gpu_hour_micros=1_500_000, reliability=0.999, location_verified=True,
                       isolation_levels=["node"]),
        "austin": shed(owner, "austin", country="US", subdivision="US-TX", gpus=1, model="L40S", vram_mb=46068,
                       cuda="12.10", price_per_gpu_hour_micros=1_000_000, reliability=0.9,
                       isolation_levels=["shared", "gpu"]),
        "munich": shed(owner, "munich", subdivision="DE-BY", gpus=2, price_per_gpu_hour_micros=2_000_000,
                       reliability=0.97, isolation_levels=["gpu"]),
    }  # fmt: skip


def names(client, query="", **params) -> list[str]:
    response = client.get(OFFERS, {"q": query, "limit": 200, **params} if query else {"limit": 200, **params})
    assert response.status_code == 200, response.content
    return sorted(offer["unit"] for offer in response.json()["results"])


@pytest.mark.parametrize(
    "query, expected",
    [
        ("gpu_name=H100", ["berlin", "munich"]),
        ("gpu_name!=H100", ["austin", "paris", "zurich"]),
        ("gpu_name in [H100,B200]", ["berlin", "munich", "paris"]),
        ("gpu_name notin [H100,B200]", ["austin", "zurich"]),
        ("num_gpus>=2", ["berlin", "munich", "paris", "zurich"]),
        ("num_gpus>4", ["berlin"]),
        ("num_gpus<2", ["austin"]),
        ("num_gpus<=2", ["austin", "munich", "paris"]),
        ("num_gpus=4", ["zurich"]),
        ("gpu_ram>=80", ["berlin", "munich", "paris"]),
        ("gpu_ram<44", ["zurich"]),
        ("country in [DE,FR,NL]", ["berlin", "munich", "paris"]),
        ("country=de", ["berlin", "munich"]),
        ("country notin [DE,US]", ["paris", "zurich"]),
        ("country!=DE", ["austin", "paris", "zurich"]),
        ("subdivision=DE-BY", ["munich"]),
        ("subdivision in [DE-BE,US-TX]", ["austin", "berlin"]),
        ("jurisdiction=DE-BY", ["munich"]),
        ("jurisdiction in [CH,US-TX]", ["austin", "zurich"]),
        ("verified=true", ["berlin", "zurich"]),
        ("verified!=true", ["austin", "munich", "paris"]),
        ("isolation>=gpu", ["austin", "berlin", "munich", "paris", "zurich"]),
        ("isolation>gpu", ["berlin", "zurich"]),
        ("isolation=mig", ["paris"]),
        ("isolation<mig", ["austin"]),
        ("isolation notin [shared,mig]", ["berlin", "munich", "zurich"]),
        ("price_per_gpu_hour<=2.5", ["austin", "berlin", "munich", "zurich"]),
        ("price_per_gpu_hour<2.5", ["austin", "munich", "zurich"]),
        ("price_per_gpu_hour=1", ["austin"]),
        ("reliability>0.98", ["berlin", "zurich"]),
        ("reliability<0.95", ["austin"]),
        ("cuda>=12.4", ["austin", "berlin", "munich", "paris"]),
        ("cuda<12.4", ["zurich"]),
        ("cuda=12.10", ["austin"]),
        ("unit=paris", ["paris"]),
        ("unit in [paris,zurich]", ["paris", "zurich"]),
        ("gpu_name in [H100,B200] num_gpus>=2 gpu_ram>=80 country in [DE,FR,NL] jurisdiction=EU "
         "verified=true isolation>=gpu price_per_gpu_hour<=2.5 reliability>0.98", ["berlin"]),
    ],
)  # fmt: skip
def test_each_operator_and_field_filters_the_offers(fleet, renter_api, query, expected):
    assert names(renter_api, query) == expected


@pytest.mark.parametrize(
    "query, expected",
    [
        ("jurisdiction=EU", ["berlin", "munich", "paris"]),
        ("jurisdiction=DACH", ["berlin", "munich", "zurich"]),
        ("jurisdiction=EFTA", ["zurich"]),
        ("jurisdiction=EU+CH", ["berlin", "munich", "paris", "zurich"]),
        ("jurisdiction in [EEA,US]", ["austin", "berlin", "munich", "paris"]),
        ("jurisdiction!=EU", ["austin", "zurich"]),
        ("jurisdiction notin [DACH]", ["austin", "paris"]),
    ],
)
def test_jurisdictions_take_named_sets(fleet, renter_api, query, expected):
    assert names(renter_api, query) == expected


def test_plain_parameters_filter_like_the_query(fleet, renter_api):
    assert names(renter_api, gpu_name="H100", num_gpus__gte=4) == ["berlin"]
    assert names(renter_api, country__in="DE,CH", verified="true") == ["berlin", "zurich"]
    assert names(renter_api, "reliability>0.96", price_per_gpu_hour__lt="2.5") == ["munich", "zurich"]


@pytest.mark.parametrize(
    "query, token, position",
    [
        ("gpu_nme=H100", "gpu_nme", 0),
        ("num_gpus=>2", "=>", 8),
        ("num_gpus ~ 2", "~", 9),
        ("num_gpus like 2", "like", 9),
        ("gpu_name in [H100,B200", "[", 12),
        ("num_gpus>=two", "two", 10),
        ("price_per_gpu_hour<=2,5", ",", 21),
        ("reliability>", "", 12),
        ("country=XX", "XX", 8),
        ("jurisdiction=MARS", "MARS", 13),
        ("isolation>=vm", "vm", 11),
        ("verified=maybe", "maybe", 9),
        ("country<DE", "<", 0),
        ("gpu_name in H100", "H100", 12),
        ("num_gpus=2 $", "$", 11),
    ],
)
def test_a_bad_query_is_a_400_naming_the_token_and_its_position(fleet, renter_api, query, token, position):
    body = problem_of(renter_api.get(OFFERS, {"q": query}), 400)

    assert f"at position {position} ('{token}')" in body["detail"]
    assert body["errors"] == {"q": [body["detail"]]}


def test_bad_plain_parameters_sort_limit_and_cursor_are_400s(fleet, renter_api):
    unknown = problem_of(renter_api.get(OFFERS, {"gpu_nme": "H100"}), 400)
    assert unknown["errors"] == {"gpu_nme": [unknown["detail"]]}
    assert "in parameter gpu_nme ('gpu_nme')" in unknown["detail"]
    bad = problem_of(renter_api.get(OFFERS, {"num_gpus__gte": "x"}), 400)
    assert bad["errors"] == {
        "num_gpus__gte": ["Bad value for num_gpus: 'x' is not a whole number in parameter num_gpus__gte ('x')"]
    }
    assert "sort" in problem_of(renter_api.get(OFFERS, {"sort": "colour"}), 400)["errors"]
    assert "limit" in problem_of(renter_api.get(OFFERS, {"limit": "0"}), 400)["errors"]
    assert "cursor" in problem_of(renter_api.get(OFFERS, {"cursor": "!!"}), 400)["errors"]


def test_the_parser_never_evaluates(fleet, renter_api):
    with pytest.raises(offers.QueryError):
        offers.parse("unit=__import__('os')")


@pytest.mark.parametrize("sort", ["price_per_gpu_hour", "-price_per_gpu_hour", "-reliability", "num_gpus",
                                  "-gpu_ram", "gpu_name", "country", "-unit", "verified"])  # fmt: skip
def test_cursor_pages_cover_every_offer_once_in_order(owner, renter_api, sort):
    # Ties on purpose: three prices, two reliabilities, one model.
    for n in range(11):
        shed(owner, f"shed-{n:02}", gpus=1 + n % 3, price_per_gpu_hour_micros=1_000_000 * (1 + n % 3),
             reliability=0.9 + (n % 2) / 20, location_verified=n % 2 == 0)  # fmt: skip
    seen, url, pages = [], OFFERS, 0
    params = {"sort": sort, "limit": 3}
    while url:
        body = renter_api.get(url, params if url == OFFERS else None).json()
        seen += body["results"]
        url, pages = body["next"], pages + 1
    assert pages == 4
    assert sorted(offer["unit"] for offer in seen) == [f"shed-{n:02}" for n in range(11)]
    whole = renter_api.get(OFFERS, {"sort": sort, "limit": 200}).json()["results"]
    assert [offer["unit_id"] for offer in seen] == [offer["unit_id"] for offer in whole]
    key = {"price_per_gpu_hour": lambda o: float(o["price_per_gpu_hour"]), "num_gpus": lambda o: o["free_gpus"],
           "gpu_ram": lambda o: o["vram_gb"], "gpu_name": lambda o: o["gpu_model"], "unit": lambda o: o["unit"],
           "reliability": lambda o: o["reliability"], "country": lambda o: o["country"],
           "verified": lambda o: o["location_verified"]}[sort.lstrip("-")]  # fmt: skip
    assert [key(o) for o in seen] == sorted((key(o) for o in seen), reverse=sort.startswith("-"))


def test_a_cursor_from_another_sort_is_refused(owner, renter_api):
    for n in range(3):
        shed(owner, f"shed-{n}")
    following = renter_api.get(OFFERS, {"limit": 1}).json()["next"]
    cursor = following.split("cursor=")[1]
    assert "cursor" in problem_of(renter_api.get(OFFERS, {"sort": "-reliability", "cursor": cursor}), 400)["errors"]


def test_busy_offline_and_unhealthy_capacity_is_not_offered(owner, renter, renter_api):
    shed(owner, "full", gpus=2)
    shed(owner, "half", gpus=2)
    job_place(job_id=job_make(renter, gpu_count=2).pk)
    busy = {o["unit"]: o["free_gpus"] for o in renter_api.get(OFFERS).json()["results"]}
    assert len(busy) == 1 and list(busy.values()) == [2], "one unit is wholly leased and not offered"

    Unit.objects.filter(name__in=busy).update(status=Unit.Status.OFFLINE)
    shed(owner, "sick", gpus=2)
    GPU.objects.filter(unit__name="sick", index=0).update(healthy=False)
    shed(owner, "draining", gpus=2)
    Unit.objects.filter(name="draining").update(status=Unit.Status.DRAINING)
    shed(owner, "unadvertised", gpus=1)
    unit = Unit.objects.get(name="unadvertised")
    unit_heartbeat(unit=unit, gpus=gpus_make(1, prefix="GPU-unadvertised"), advertise=[])

    offered = renter_api.get(OFFERS).json()["results"]
    assert [(o["unit"], o["free_gpus"]) for o in offered] == [("sick", 1)]


def test_offers_follow_capacity_as_it_is_leased_and_released(owner, renter, renter_api):
    shed(owner, "berlin", gpus=4)
    assert [o["free_gpus"] for o in renter_api.get(OFFERS).json()["results"]] == [4]

    allocation = job_place(job_id=job_make(renter, gpu_count=3).pk)
    assert [o["free_gpus"] for o in renter_api.get(OFFERS, {"q": "num_gpus>=1"}).json()["results"]] == [1]
    assert renter_api.get(OFFERS, {"q": "num_gpus>=2"}).json()["results"] == []

    job_cancel(job=allocation.job, actor="test")
    assert [o["free_gpus"] for o in renter_api.get(OFFERS, {"q": "num_gpus>=2"}).json()["results"]] == [4]


def test_only_changed_units_are_recomputed(owner, renter):
    for n in range(3):
        shed(owner, f"shed-{n}", gpus=2)
    assert offers.snapshots_refresh() == 3
    assert offers.snapshots_refresh() == 0
    job_place(job_id=job_make(renter, gpu_count=1).pk)
    assert tasks.offer_snapshots_refresh() == 1  # as beat runs it
    assert offers.snapshots_refresh() == 0
    assert sorted(offers.offers().values_list("free_gpus", flat=True)) == [1, 2, 2]


def test_an_offer_shows_the_unit_and_the_limits_in_force(owner, renter_api):
    unit = shed(owner, "berlin", subdivision="DE-BE", gpus=3, price_per_gpu_hour_micros=2_345_000, reliability=0.987,
                location_verified=True, isolation_levels=["mig", "gpu"])  # fmt: skip
    Unit.objects.filter(pk=unit.pk).update(limits={"in_force": ["quiet_hours", "thermal"], "advertised_gpus": 3})

    (offer,) = renter_api.get(OFFERS).json()["results"]

    assert offer == {
        "unit_id": str(unit.pk), "unit": "berlin", "country": "DE", "subdivision": "DE-BE",
        "location_verified": True, "gpu_model": "H100", "vram_gb": 80.0, "free_gpus": 3,
        "isolation_levels": ["mig", "gpu"], "price_per_gpu_hour": "2.345000", "reliability": 0.987, "cuda": "12.4",
        "limits_in_force": ["quiet_hours", "thermal"],
    }  # fmt: skip


@pytest.mark.parametrize("count", [1, 12])
def test_a_page_takes_a_fixed_number_of_queries(owner, renter_api, count, django_assert_num_queries):
    for n in range(count):
        shed(owner, f"shed-{n}")
    renter_api.get(OFFERS)  # the first call also touches the key's last use and takes the snapshots
    with django_assert_num_queries(OFFER_PAGE_QUERIES):
        response = renter_api.get(OFFERS, {"q": "gpu_name=H100 num_gpus>=1", "limit": 5})
    assert len(response.json()["results"]) == min(count, 5)


def test_anonymous_gets_401(client, fleet):
    problem_of(client.get(OFFERS), 401)


@pytest.mark.parametrize(
    "params",
    [{"q": "price_per_gpu_hour<=1e999990"}, {"gpu_ram__gte": "1e200000"}, {"q": "gpu_ram>=1e999999"},
     {"price_per_gpu_hour": "1e999999"}, {"q": "num_gpus>=99999999999999999999999"}, {"reliability__lt": "NaN"},
     {"reliability": "1e-999999"}, {"q": "reliability>=Infinity"}, {"num_gpus__in": "1,2,1e9"},
     {"price_per_gpu_hour__lte": "-1"}, {"limit": "1e3"}, {"limit": "9" * 5000}],
)  # fmt: skip
def test_hostile_numbers_are_a_400_without_arithmetic(fleet, renter_api, params):
    body = problem_of(renter_api.get(OFFERS, params), 400)

    assert list(body["errors"]) == [next(iter(params))]


@pytest.mark.parametrize(
    "cursor",
    ["W1siYSJdXQ", "A" * 600, "WyJwcmljZV9wZXJfZ3B1X2hvdXIiLCAxZTk5OSwgIngiXQ",  # nested list; too long; 1e999
     "WyJwcmljZV9wZXJfZ3B1X2hvdXIiLCB7fSwgIngiXQ"],  # an object as the value
)  # fmt: skip
def test_a_forged_cursor_is_a_400(fleet, renter_api, cursor):
    assert "cursor" in problem_of(renter_api.get(OFFERS, {"cursor": cursor}), 400)["errors"]


def test_a_query_longer_than_the_bound_is_a_400(fleet, renter_api):
    assert "q" in problem_of(renter_api.get(OFFERS, {"q": "unit=a " * 400}), 400)["errors"]


@pytest.mark.parametrize(
    "limits",
    [{"in_force": 5}, [1, 2], "thermal", {"in_force": [None, {"a": 1}, "quiet_hours", "<script>"]}, 7],
)
def test_limits_stored_in_a_bad_shape_before_validation_show_as_none(owner, renter_api, limits):
    unit = shed(owner, "berlin", gpus=2)
    Unit.objects.filter(pk=unit.pk).update(limits=limits)

    response = renter_api.get(OFFERS)

    assert response.status_code == 200
    (offer,) = response.json()["results"]
    expected = ["quiet_hours"] if isinstance(limits, dict) and isinstance(limits["in_force"], list) else []
    assert offer["limits_in_force"] == expected
