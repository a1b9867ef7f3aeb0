"""The renter's jobs page and the owner's earnings page show only the caller's own money."""

import re
from datetime import UTC, datetime, time, timedelta

import pytest

from billing.models import BillingProfile
from billing.payouts import connect_account_ensure, payouts_run
from billing.services import usage_post
from marketplace.jobs.placement import job_place
from marketplace.jobs.usage import SampleReport, usage_record
from tests.billing.test_payouts import OLD, earned, onboarded, transfer_of
from tests.conftest import allocation_since, job_make, ledger_backdate, unit_online

pytestmark = pytest.mark.django_db


def ran_for(job, *, gpu_ms: int):
    allocation = allocation_since(job_place(job_id=job.pk), datetime.now(UTC) - timedelta(days=1))
    usage_record(allocation=allocation, samples=[SampleReport(seq=1, gpu_ms=gpu_ms, recorded_at=datetime.now(UTC))])
    usage_post(allocation_id=allocation.pk)
    return allocation


@pytest.fixture
def one_hour_at_two_dollars(owner, renter):
    unit_online(owner, name="garden", price_per_gpu_hour_micros=2_000_000)
    return ran_for(job_make(renter, name="train-llm"), gpu_ms=3_600_000)


def test_a_renter_sees_their_job_with_its_cost_and_their_balance(client, renter, one_hour_at_two_dollars):
    client.force_login(renter)
    page = client.get("/portal/jobs/").content.decode()
    assert "train-llm" in page
    assert "2.00" in page  # the job's cost
    assert "-2.00 USD" in page  # no top-up yet, so the wallet is two dollars short


def test_a_renter_does_not_see_another_renters_jobs(client, stranger, one_hour_at_two_dollars):
    client.force_login(stranger)
    page = client.get("/portal/jobs/").content.decode()
    assert "train-llm" not in page
    assert "No jobs yet" in page


def test_an_owner_sees_what_their_unit_earned_after_the_platform_fee(client, owner, one_hour_at_two_dollars, settings):
    client.force_login(owner)
    page = client.get("/portal/earnings/").content.decode()
    owed = 2_000_000 - 2_000_000 * settings.PLATFORM_FEE_PERCENT // 100
    assert f"{owed / 1_000_000:.2f} USD" in page
    assert "garden" in page


def test_an_owner_does_not_see_another_owners_earnings(client, stranger, one_hour_at_two_dollars):
    client.force_login(stranger)
    page = client.get("/portal/earnings/").content.decode()
    assert "garden" not in page
    assert "0.00 USD" in page


@pytest.mark.parametrize("path", ["/portal/jobs/", "/portal/earnings/"])
def test_money_pages_need_a_login(client, path):
    response = client.get(path)
    assert response.status_code == 302
    assert "/accounts/login/" in response["Location"]


def test_a_queued_job_says_in_words_why_it_waits(client, owner, renter):
    from marketplace.jobs.models import Job

    unit_online(owner, name="lyon", country="FR")
    unit_online(owner, name="munich", country="DE", price_per_gpu_hour_micros=9_000_000)
    job = job_make(renter, name="needs-de-cheap", jurisdictions=["DE"], max_price_per_gpu_hour_micros=1_000_000)
    assert job_place(job_id=job.pk) is None
    assert Job.objects.get(pk=job.pk).pending_reason["units_considered"] == 2
    client.force_login(renter)

    page = client.get("/portal/jobs/").content.decode()

    assert "0 of 2 units fit: 1 outside the allowed jurisdictions, 1 above the price cap" in page


def today():
    """Read at each use, not at import: the suite may pass midnight between collecting and running."""
    return datetime.now(UTC).date()


def at(days_ago: int, hour: int, minute: int = 0) -> datetime:
    return datetime.combine(today() - timedelta(days=days_ago), time(hour, minute), tzinfo=UTC)


def placed_long_ago(job):
    """The job placed, its allocation active since well before the usage the tests record."""
    return allocation_since(job_place(job_id=job.pk), at(40, 0))


def sample_posted(allocation, *, seq: int, gpu_ms: int, recorded_at: datetime, posted_at: datetime):
    """One usage sample, charged at once; the posting back-dated to a known moment (tests only)."""
    usage_record(allocation=allocation, samples=[SampleReport(seq=seq, gpu_ms=gpu_ms, recorded_at=recorded_at)])
    txn = usage_post(allocation_id=allocation.pk)
    ledger_backdate(txn, posted_at)
    return txn


@pytest.fixture
def two_days_on_the_garden(owner, renter):
    """A 4-GPU unit at $2/GPU-hour: one GPU-hour the day before yesterday, then one GPU for the whole
    of yesterday. The owner earns 85% of $2.00 and of $48.00."""
    unit_online(owner, name="garden", gpus=4, price_per_gpu_hour_micros=2_000_000)
    allocation = placed_long_ago(job_make(renter, name="train-llm"))
    sample_posted(allocation, seq=1, gpu_ms=3_600_000, recorded_at=at(2, 10), posted_at=at(2, 10, 5))
    sample_posted(allocation, seq=2, gpu_ms=86_400_000, recorded_at=at(1, 12), posted_at=at(1, 12, 5))
    return allocation


@pytest.fixture
def strangers_attic(stranger, renter):
    unit_online(stranger, name="attic", country="FR", gpus=2, price_per_gpu_hour_micros=3_000_000)
    allocation = placed_long_ago(job_make(renter, name="strangers-job", jurisdictions=["FR"]))
    sample_posted(allocation, seq=1, gpu_ms=7_200_000, recorded_at=at(1, 9), posted_at=at(1, 9, 5))
    return allocation


def earnings_page(client, user) -> str:
    client.force_login(user)
    response = client.get("/portal/earnings/")
    assert response.status_code == 200
    return response.content.decode()


def table_rows(page: str, summary: str) -> dict[str, list[str]]:
    """The rows of the table in the <details> whose summary is ``summary``, by their first cell."""
    details = page.split(f"<summary>{summary}</summary>", 1)[1].split("</details>", 1)[0].split("<tbody>", 1)[1]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", details, re.S):
        cells = [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)]
        rows[cells[0]] = cells[1:]
    return rows


def svg(page: str, chart_id: str) -> str:
    return re.search(rf'<svg [^>]*id="{chart_id}".*?</svg>', page, re.S).group(0)


class TestCharts:
    def test_earnings_per_day_are_tabled_for_thirty_days_with_the_owners_share(
        self, client, owner, two_days_on_the_garden, strangers_attic
    ):
        rows = table_rows(earnings_page(client, owner), "Earnings per day as a table")

        assert len(rows) == 30
        assert rows[str(today() - timedelta(days=2))] == ["1.70"]
        assert rows[str(today() - timedelta(days=1))] == ["40.80"]  # not the stranger's $6 of yesterday
        assert rows[str(today())] == ["0.00"]
        assert rows[str(today() - timedelta(days=29))] == ["0.00"]

    def test_the_earnings_chart_is_an_svg_with_a_bar_per_day_scaled_to_the_best_day(
        self, client, owner, two_days_on_the_garden
    ):
        chart = svg(earnings_page(client, owner), "earnings-chart")

        assert 'role="img"' in chart and '<title id="earnings-chart-title">Earnings per day</title>' in chart
        assert "<script" not in chart
        bars = re.findall(r'<rect class="bar"[^>]*height="([\d.]+)"[^>]*><title>([^<]*)</title>', chart)
        assert len(bars) == 30
        heights = dict((title, float(height)) for height, title in bars)
        best = heights[f"{today() - timedelta(days=1)}: 40.80 USD"]
        assert best == pytest.approx(180 * 40.8 / 50, abs=0.1)  # the axis tops out at 50.00, the next 1-2-5 step
        assert heights[f"{today() - timedelta(days=2)}: 1.70 USD"] == pytest.approx(180 * 1.7 / 50, abs=0.1)
        assert heights[f"{today()}: 0.00 USD"] == 0

    def test_utilisation_is_gpu_time_used_over_gpu_time_there_was(self, client, owner, two_days_on_the_garden):
        page = earnings_page(client, owner)
        rows = table_rows(page, "Utilisation of garden as a table")

        assert rows[str(today() - timedelta(days=1))] == ["24.00", "25.0%"]  # 1 of 4 GPUs, all day
        assert rows[str(today() - timedelta(days=2))] == ["1.00", "1.0%"]  # 1 GPU-hour of 96
        assert rows[str(today() - timedelta(days=3))] == ["0.00", "0.0%"]
        chart = svg(page, "utilisation-chart-1")
        assert f"<title>{today() - timedelta(days=1)}: 25.0%</title>" in chart
        assert chart.count('<rect class="bar"') == 30

    def test_a_unit_without_work_shows_zero_and_the_page_says_how_utilisation_is_counted(self, client, owner):
        unit_online(owner, name="shed-b", gpus=8)
        page = earnings_page(client, owner)

        assert set(map(tuple, table_rows(page, "Utilisation of shed-b as a table").values())) == {("0.00", "0.0%")}
        assert "GPU time jobs used on a unit" in page and "the GPUs it reports now" in page

    def test_the_page_has_no_scripts_of_its_own_or_from_a_cdn(self, client, owner, two_days_on_the_garden):
        page = earnings_page(client, owner)

        scripts = re.findall(r"<script[^>]*>", page)
        assert all(re.fullmatch(r'<script src="/static/vendor/[^"]+" defer>', tag) for tag in scripts), scripts
        assert "https://" not in page


class TestScoping:
    def test_an_owner_sees_none_of_another_owners_units_earnings_or_transfers(
        self, client, owner, stranger, two_days_on_the_garden, strangers_attic
    ):
        page = earnings_page(client, stranger)

        assert "garden" not in page and "train-llm" not in page
        assert "attic" in page
        assert table_rows(page, "Earnings per day as a table")[str(today() - timedelta(days=1))] == ["5.10"]
        assert str(two_days_on_the_garden.job_id)[:8] not in page

    def test_the_csv_holds_only_the_callers_lines(self, client, stranger, two_days_on_the_garden, strangers_attic):
        client.force_login(stranger)
        body = b"".join(client.get("/portal/earnings.csv").streaming_content).decode()

        assert "garden" not in body
        assert body.count("\r\n") == 2  # the header and the attic's one line

    def test_transfers_are_the_callers_own_newest_first(self, client, owner, stranger, renter, stripe_fake):
        onboarded(owner, stripe_fake)
        onboarded(stranger, stripe_fake)
        earned(owner, renter, 50_000_000, at=OLD, key="owner-earned")
        earned(stranger, renter, 20_000_000, at=OLD, key="stranger-earned")
        paid = {txn.key.split(":")[1]: txn for txn in payouts_run()}
        sent = transfer_of(paid[str(owner.pk)])  # the stranger's transfer stays in the outbox

        owners = earnings_page(client, owner)
        strangers = earnings_page(client, stranger)

        # 50.00 less the 10% reserve is 45.00; 20.00 less 10% is 18.00.
        assert re.search(rf"<td class=\"num\">45.00</td>\s*<td>Sent</td>\s*<td>{sent.stripe_id}</td>", owners)
        assert "18.00" not in owners
        assert re.search(r"<td class=\"num\">18.00</td>\s*<td>Pending</td>\s*<td>—</td>", strangers)
        assert sent.stripe_id not in strangers

    @pytest.mark.parametrize("path", ["/portal/earnings.csv", "/portal/payouts/return/", "/portal/payouts/connect/"])
    def test_the_other_money_pages_need_a_login(self, client, path):
        response = client.get(path)
        assert response.status_code == 302
        assert "/accounts/login/" in response["Location"]


class TestCsv:
    def test_one_row_per_earning_with_exact_decimal_amounts(self, client, owner, two_days_on_the_garden):
        client.force_login(owner)
        response = client.get("/portal/earnings.csv")
        body = b"".join(response.streaming_content).decode()

        job = two_days_on_the_garden.job_id
        assert response["Content-Type"] == "text/csv; charset=utf-8"
        assert response["Content-Disposition"] == f'attachment; filename="shedshare-earnings-{today()}.csv"'
        assert body == (
            "date,unit,job_id,gpu_seconds,amount,currency\r\n"
            f"{today() - timedelta(days=2)}T10:05:00Z,garden,{job},3600.000,1.700000,USD\r\n"
            f"{today() - timedelta(days=1)}T12:05:00Z,garden,{job},86400.000,40.800000,USD\r\n"
        )

    def test_an_amount_below_a_cent_is_not_rounded(self, client, owner, renter):
        unit_online(owner, name="garden", price_per_gpu_hour_micros=1_234_567)
        allocation = placed_long_ago(job_make(renter))
        sample_posted(allocation, seq=1, gpu_ms=1_001, recorded_at=at(1, 8), posted_at=at(1, 8))
        client.force_login(owner)

        body = b"".join(client.get("/portal/earnings.csv").streaming_content).decode()

        # 1,001 GPU-ms at 1,234,567 micros/GPU-hour is 343 micros; the owner keeps 343 - 51.
        assert body.splitlines()[1].endswith(",garden," + str(allocation.job_id) + ",1.001,0.000292,USD")

    def test_a_formula_in_a_unit_name_is_not_run_by_a_spreadsheet(self, client, owner, renter):
        unit_online(owner, name="=HYPERLINK(1)", price_per_gpu_hour_micros=2_000_000)
        allocation = placed_long_ago(job_make(renter))
        sample_posted(allocation, seq=1, gpu_ms=3_600_000, recorded_at=at(1, 8), posted_at=at(1, 8))
        client.force_login(owner)

        body = b"".join(client.get("/portal/earnings.csv").streaming_content).decode()

        assert ",'=HYPERLINK(1)," in body


CONNECT_FORM = '<form method="post" action="/portal/payouts/connect/">'


def without_csrf(page: str) -> str:
    return re.sub(r'<input type="hidden" name="csrfmiddlewaretoken" value="[^"]+">', "", page)


class TestConnect:
    def test_without_stripe_the_page_says_payouts_are_unavailable(self, client, owner, settings):
        settings.STRIPE_SECRET_KEY = ""
        page = earnings_page(client, owner)

        assert "Payouts are unavailable." in page
        assert "Set up payouts with Stripe" not in page

    def test_without_stripe_the_connect_button_answers_503_in_words(self, client, owner, settings):
        settings.STRIPE_SECRET_KEY = ""
        client.force_login(owner)
        response = client.post("/portal/payouts/connect/")

        assert response.status_code == 503
        assert "Payouts cannot be set up on this marketplace yet." in response.content.decode()

    def test_an_owner_without_an_account_is_offered_onboarding(self, client, owner, stripe_fake):
        page = earnings_page(client, owner)

        assert "Not connected." in page
        assert CONNECT_FORM + '<button type="submit">Set up payouts with Stripe</button></form>' in without_csrf(page)

    def test_an_owner_who_started_onboarding_is_asked_to_continue(self, client, owner, stripe_fake):
        connect_account_ensure(owner=owner)
        page = earnings_page(client, owner)

        assert "Onboarding incomplete." in page
        assert CONNECT_FORM + '<button type="submit">Continue Stripe onboarding</button></form>' in without_csrf(page)

    def test_an_owner_with_payouts_enabled_is_told_so_without_a_button(self, client, owner, stripe_fake):
        account_id = onboarded(owner, stripe_fake)
        page = earnings_page(client, owner)

        assert "Payouts enabled." in page and account_id in page
        assert "Continue Stripe onboarding" not in page and "Set up payouts with Stripe" not in page

    def test_the_return_page_asks_stripe_and_shows_what_a_restricted_account_still_needs(
        self, client, owner, stripe_fake
    ):
        account_id = connect_account_ensure(owner=owner)
        requirements = {"currently_due": ["external_account", "individual.dob.day"], "past_due": []}
        stripe_fake.account_update(
            account_id,
            details_submitted=True,
            requirements={**requirements, "disabled_reason": "requirements.past_due"},
        )
        client.force_login(owner)

        page = client.get("/portal/payouts/return/").content.decode()

        assert "Payouts restricted." in page
        assert "<li>a bank account to pay out to</li>" in page and "<li>individual.dob.day</li>" in page
        assert "Continue Stripe onboarding" in page

    def test_the_return_page_shows_onboarding_left_half_done(self, client, owner, stripe_fake):
        connect_account_ensure(owner=owner)
        client.force_login(owner)

        assert "Onboarding incomplete." in client.get("/portal/payouts/return/").content.decode()

    def test_the_return_page_knows_payouts_are_on_before_the_webhook_says_so(self, client, owner, stripe_fake):
        account_id = connect_account_ensure(owner=owner)
        stripe_fake.account_update(account_id, details_submitted=True, payouts_enabled=True)
        client.force_login(owner)

        page = client.get("/portal/payouts/return/").content.decode()

        assert "Payouts enabled." in page
        assert BillingProfile.objects.get(user=owner).payouts_enabled is False  # a page never writes it


def units_with_work(owner, renter, *, units: int):
    for n in range(units):
        unit_online(owner, name=f"shed-{n}", gpus=2, price_per_gpu_hour_micros=1_000_000 + n)
    for n in range(units):
        allocation = placed_long_ago(job_make(renter, name=f"job-{n}"))
        sample_posted(allocation, seq=1, gpu_ms=3_600_000, recorded_at=at(1, n), posted_at=at(1, n, 1))
        sample_posted(allocation, seq=2, gpu_ms=1_800_000, recorded_at=at(0, 0), posted_at=at(0, 0, 1))


# Session, user, payable, earnings per day, units, usage per unit-day (samples, and the hours rolled up
# from older ones), recent lines, transfers, Connect profile.
EARNINGS_PAGE_QUERIES = 10


@pytest.mark.parametrize("units", [1, 6])
def test_the_earnings_page_takes_a_fixed_number_of_queries(
    client, owner, renter, stripe_fake, units, django_assert_num_queries
):
    units_with_work(owner, renter, units=units)
    onboarded(owner, stripe_fake)
    client.force_login(owner)

    with django_assert_num_queries(EARNINGS_PAGE_QUERIES):
        page = client.get("/portal/earnings/").content.decode()

    assert page.count("<details>") == 1 + units
