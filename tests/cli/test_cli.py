"""The `shedshare` renter CLI, run with click's CliRunner against the real app over WSGI (no network)."""

import json
import socket
import stat

import httpx
import pytest
from click.testing import CliRunner
from django.core import signals
from django.core.handlers.wsgi import WSGIHandler
from django.db import close_old_connections

from billing.services import wallet_credit_promotional
from marketplace.accounts.services import api_key_create
from marketplace.cli import client as cli_client
from marketplace.cli import commands, main
from marketplace.jobs.models import Job
from marketplace.jobs.services import job_cancel
from tests.conftest import JOB_SPEC, job_make

SERVER = "http://testserver"
JOB_YAML = """\
name: fine-tune
image: ghcr.io/acme/train:1.0
command: [python, train.py, --epochs, "3"]
gpu_count: 1
jurisdictions: [EU]
max_price_per_gpu_hour: 2.5
"""


@pytest.fixture
def wsgi_app(db, monkeypatch):
    """The Django app as the CLI's transport. Django closes the database connection after each
    request, which would end the test's transaction; its own test client unhooks this the same way."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    monkeypatch.setattr(cli_client, "transport", httpx.WSGITransport(app=WSGIHandler()))
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def config_path(tmp_path, monkeypatch):
    path = tmp_path / "shedshare" / "config.json"
    monkeypatch.setenv("SHEDSHARE_CONFIG", str(path))
    monkeypatch.delenv("SHEDSHARE_URL", raising=False)
    monkeypatch.delenv("SHEDSHARE_API_KEY", raising=False)
    return path


@pytest.fixture
def api_key(renter):
    return api_key_create(user=renter, name="cli")[1]


@pytest.fixture
def logged_in(wsgi_app, config_path, api_key, monkeypatch):
    monkeypatch.setenv("SHEDSHARE_URL", SERVER)
    monkeypatch.setenv("SHEDSHARE_API_KEY", api_key)


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def fake_server(monkeypatch, handler) -> list[httpx.Request]:
    """An httpx.MockTransport in place of the server; returns the requests it saw."""
    seen = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    monkeypatch.setattr(cli_client, "transport", httpx.MockTransport(record))
    monkeypatch.setenv("SHEDSHARE_URL", SERVER)
    monkeypatch.setenv("SHEDSHARE_API_KEY", "shs_live_fake")
    return seen


@pytest.fixture
def job_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(JOB_YAML)
    return path


class TestLogin:
    def test_login_checks_the_key_and_saves_it_readable_by_the_owner_only(self, wsgi_app, config_path, api_key):
        result = run("login", "--url", SERVER, input=api_key + "\n")

        assert result.exit_code == 0, result.output
        assert "Logged in to http://testserver" in result.stdout
        assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
        assert json.loads(config_path.read_text()) == {"url": SERVER, "key": api_key}
        assert run("balance").exit_code == 0

    def test_a_wrong_key_is_refused_and_nothing_is_saved(self, wsgi_app, config_path):
        result = run("login", "--url", SERVER, "--key", "shs_live_wrong")

        assert result.exit_code == 1
        assert "Unauthorized (401)" in result.stderr
        assert "shedshare login" in result.stderr
        assert not config_path.exists()

    def test_without_credentials_commands_say_how_to_log_in(self, config_path):
        result = run("jobs")

        assert result.exit_code == 1
        assert "not logged in: run `shedshare login`" in result.stderr


class TestSubmit:
    def test_submit_prints_the_job_id(self, logged_in, job_file, renter):
        result = run("submit", str(job_file))

        assert result.exit_code == 0, result.output
        job = Job.objects.get(renter=renter)
        assert result.stdout == f"Submitted job {job.pk} (queued)\n"
        assert job.command == ["python", "train.py", "--epochs", "3"]
        assert job.jurisdictions == ["EU"]
        assert job.max_price_per_gpu_hour_micros == 2_500_000

    def test_a_service_is_submitted_with_how_to_reach_its_ports(self, logged_in, tmp_path, renter):
        spec = tmp_path / "serve.json"
        spec.write_text(json.dumps({"image": "ghcr.io/acme/serve:1", "command": ["serve"], "workload_class": "service",
                                    "ports": [{"port": 8000}, {"port": 22, "protocol": "tcp"}]}))  # fmt: skip
        result = run("submit", str(spec))

        assert result.exit_code == 0, result.output
        job = Job.objects.get(renter=renter)
        assert result.stdout.splitlines()[1:] == [
            f"  port 8000 (http): http://testserver/services/{job.pk}/8000/",
            f"  port 22 (tcp): shedshare forward {job.pk} 22",
        ]

    def test_forward_without_a_listening_port_is_one_readable_line(self, logged_in):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = run("forward", "00000000-0000-0000-0000-000000000000", "22", "--local-port", str(port))
        assert result.exit_code == 1
        assert result.stderr.startswith(f"Error: cannot listen on 127.0.0.1:{port}")

    def test_json_prints_the_created_job(self, logged_in, tmp_path, renter):
        path = tmp_path / "job.json"
        path.write_text(json.dumps(JOB_SPEC))

        result = run("--json", "submit", str(path))

        assert result.exit_code == 0, result.output
        body = json.loads(result.stdout)
        assert body["id"] == str(Job.objects.get(renter=renter).pk)
        assert body["state"] == "queued"

    def test_a_bad_spec_shows_the_field_errors_and_exits_1(self, logged_in, tmp_path, renter):
        path = tmp_path / "job.yaml"
        path.write_text("image: Not An Image\ngpu_count: 0\ncolour: red\n")

        result = run("submit", str(path))

        assert result.exit_code == 1
        assert result.stdout == ""
        assert "Invalid request (400)" in result.stderr
        assert "colour: Unknown field." in result.stderr
        assert not Job.objects.filter(renter=renter).exists()

    def test_a_file_that_is_not_a_mapping_is_refused_before_any_call(self, logged_in, tmp_path):
        path = tmp_path / "job.yaml"
        path.write_text("- just\n- a list\n")

        result = run("submit", str(path))

        assert result.exit_code == 1
        assert "a job file is a mapping" in result.stderr

    def test_a_resend_after_a_network_error_carries_the_same_idempotency_key(self, monkeypatch, job_file):
        monkeypatch.setattr(commands, "SUBMIT_RETRY_DELAYS_S", (0.0,))
        job = {"id": "0b7a0d0e-0000-4000-8000-000000000001", "state": "queued"}

        def first_fails(request):
            if len(seen) == 1:
                raise httpx.ConnectError("connection reset")
            return httpx.Response(201, json=job)

        seen = fake_server(monkeypatch, first_fails)

        result = run("submit", str(job_file), "--idempotency-key", "k-123")

        assert result.exit_code == 0, result.output
        assert [r.headers["Idempotency-Key"] for r in seen] == ["k-123", "k-123"]
        assert json.loads(seen[1].content)["name"] == "fine-tune"

    def test_wait_shows_why_pending_then_the_end_and_exits_1_unless_it_succeeded(
        self, logged_in, job_file, renter, monkeypatch
    ):
        def meanwhile(seconds):
            job = Job.objects.get(renter=renter)
            if not job.pending_reason:
                job.pending_reason = {"units_considered": 3, "rejected": {"jurisdiction": 3}}
                job.save(update_fields=["pending_reason"])
            else:
                job_cancel(job=job, actor="test")

        monkeypatch.setattr(commands, "sleep", meanwhile)

        result = run("submit", str(job_file), "--wait")

        assert result.exit_code == 1, result.output
        lines = result.stdout.splitlines()
        assert "queued" in lines[1]
        assert "(0 of 3 units fit: 3 outside the allowed jurisdictions)" in lines[2]
        assert lines[-1].endswith("cancelled")

    def test_wait_exits_0_when_the_job_succeeds(self, monkeypatch, job_file):
        states = iter(["placed", "running", "succeeded"])
        job = {"id": "0b7a0d0e-0000-4000-8000-000000000002", "state": "queued", "exit_code": None}

        def server(request):
            if request.method == "POST":
                return httpx.Response(201, json=job)
            return httpx.Response(200, json={**job, "state": next(states)})

        fake_server(monkeypatch, server)
        monkeypatch.setattr(commands, "sleep", lambda seconds: None)

        result = run("submit", str(job_file), "--wait")

        assert result.exit_code == 0, result.output
        assert [line.split()[-1] for line in result.stdout.splitlines()[1:]] == [
            "queued",
            "placed",
            "running",
            "succeeded",
        ]


class TestJobs:
    def test_jobs_lists_the_renters_jobs_and_filters_by_state(self, logged_in, renter, stranger):
        kept, cancelled = job_make(renter, name="kept"), job_make(renter, name="dropped")
        job_cancel(job=cancelled, actor="test")
        foreign = job_make(stranger)

        everything = run("jobs")
        only_cancelled = run("jobs", "--state", "cancelled")

        assert everything.exit_code == 0, everything.output
        assert everything.stdout.startswith("ID")
        assert str(kept.pk) in everything.stdout and str(cancelled.pk) in everything.stdout
        assert str(foreign.pk) not in everything.stdout
        assert str(kept.pk) not in only_cancelled.stdout and str(cancelled.pk) in only_cancelled.stdout

    def test_jobs_follows_the_pages(self, logged_in, renter, settings):
        settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "PAGE_SIZE": 2}
        made = {str(job_make(renter).pk) for _ in range(5)}

        result = run("--json", "jobs")

        assert {job["id"] for job in json.loads(result.stdout)} == made

    def test_cancel(self, logged_in, renter):
        job = job_make(renter)

        result = run("cancel", str(job.pk))

        assert result.exit_code == 0, result.output
        assert result.stdout == f"{job.pk}  cancelled\n"
        job.refresh_from_db()
        assert job.state == Job.State.CANCELLED

    def test_another_renters_job_is_not_found(self, logged_in, stranger):
        job = job_make(stranger)

        result = run("cancel", str(job.pk))

        assert result.exit_code == 1
        assert "(404)" in result.stderr
        job.refresh_from_db()
        assert job.state == Job.State.QUEUED


class TestMoneyAndErrors:
    def test_balance(self, logged_in, renter):
        wallet_credit_promotional(user=renter, amount_micros=12_500_000, key="cli-test")

        human, raw = run("balance"), run("--json", "balance")

        assert human.stdout.startswith("12.500000 ")
        assert json.loads(raw.stdout)["balance"] == "12.500000"

    def test_an_unreachable_server_is_named_without_a_traceback(self, monkeypatch, config_path):
        def refuse(request):
            raise httpx.ConnectError("[Errno 111] Connection refused")

        fake_server(monkeypatch, refuse)
        monkeypatch.setenv("SHEDSHARE_URL", "http://127.0.0.1:9")

        result = CliRunner().invoke(main, ["balance"])

        assert result.exit_code == 1
        assert (
            result.stderr
            == "Error: could not reach http://127.0.0.1:9/api/v1/balance: [Errno 111] Connection refused\n"
        )

    def test_a_briefly_unavailable_server_is_asked_again_after_its_retry_after(self, monkeypatch, config_path):
        answers = [
            httpx.Response(503, headers={"Retry-After": "5"}, json={"title": "Service unavailable"}),
            httpx.Response(429, json={"title": "Too many requests"}),  # no Retry-After: the backoff
            httpx.Response(200, json={"currency": "usd", "balance": "1.000000"}),
        ]
        seen = fake_server(monkeypatch, lambda request: answers.pop(0))
        waits = []
        monkeypatch.setattr(cli_client, "sleep", waits.append)

        result = run("balance")

        assert result.exit_code == 0 and result.stdout.startswith("1.000000 ")
        assert len(seen) == 3 and waits == [5.0, 2.0]

    def test_an_outage_that_lasts_ends_in_a_readable_error(self, monkeypatch, config_path):
        unavailable = {"title": "Service unavailable", "detail": "Try again after Retry-After."}
        seen = fake_server(monkeypatch, lambda request: httpx.Response(503, json=unavailable))
        waits = []
        monkeypatch.setattr(cli_client, "sleep", waits.append)

        result = CliRunner().invoke(main, ["balance"])

        assert result.exit_code == 1
        assert "Service unavailable (503)" in result.stderr
        assert len(seen) == cli_client.RETRIES + 1 and waits == [1.0, 2.0, 4.0]


OFFER = {
    "unit": "garden-shed",
    "country": "DE",
    "subdivision": "DE-BY",
    "location_verified": True,
    "gpu_model": "H100",
    "vram_gb": 80,
    "free_gpus": 4,
    "isolation_levels": ["gpu", "node"],
    "price_per_gpu_hour": "2.100000",
    "reliability": 0.991,
    "limits_in_force": ["quiet hours"],
}


class TestOffers:
    def test_offers_prints_a_table_following_the_cursor_up_to_the_limit(self, monkeypatch):
        def server(request):
            if "cursor" in request.url.params:
                return httpx.Response(200, json={"results": [{**OFFER, "unit": "b"}] * 3, "next": None})
            return httpx.Response(200, json={"results": [OFFER], "next": f"{SERVER}/api/v1/offers?cursor=2"})

        seen = fake_server(monkeypatch, server)

        result = run("offers", "gpu_name=H100 num_gpus>=2", "--sort", "-reliability", "--limit", "3")

        assert result.exit_code == 0, result.output
        header, first, *rest = result.stdout.splitlines()
        assert header.split() == [
            "UNIT", "WHERE", "VERIFIED", "GPU", "VRAM", "FREE", "ISOLATION", "PRICE/GPU-H", "RELIABILITY", "LIMITS"
        ]  # fmt: skip
        assert first.split() == [
            "garden-shed", "DE-BY", "yes", "H100", "80", "GB", "4", "gpu,node", "2.100000", "0.991", "quiet", "hours"
        ]  # fmt: skip
        assert len(rest) == 2
        assert seen[0].url.params["q"] == "gpu_name=H100 num_gpus>=2"
        assert seen[0].url.params["sort"] == "-reliability"
        assert seen[0].url.params["limit"] == "3"

    def test_a_bad_query_shows_the_servers_detail(self, monkeypatch):
        problem = {"type": "/problems/invalid-query", "title": "Invalid query", "status": 400,
                   "detail": "Unknown field 'gpu_nam' at 'gpu_nam=H100'."}  # fmt: skip
        fake_server(
            monkeypatch,
            lambda r: httpx.Response(400, json=problem, headers={"Content-Type": "application/problem+json"}),
        )

        result = run("offers", "gpu_nam=H100")

        assert result.exit_code == 1
        assert "Invalid query (400)" in result.stderr
        assert "Unknown field 'gpu_nam' at 'gpu_nam=H100'." in result.stderr


class TestLogs:
    def test_follow_prints_each_page_until_complete(self, monkeypatch):
        pages = iter(
            [
                {"offset": 0, "next_offset": 6, "data": "epoch\n", "complete": False},
                {"offset": 6, "next_offset": 6, "data": "", "complete": False},
                {"offset": 6, "next_offset": 11, "data": "done\n", "complete": True},
            ]
        )
        seen = fake_server(monkeypatch, lambda request: httpx.Response(200, json=next(pages)))
        monkeypatch.setattr(commands, "sleep", lambda seconds: None)

        result = run("logs", "-f", "job-1")

        assert result.exit_code == 0, result.output
        assert result.stdout == "epoch\ndone\n"
        assert [r.url.params["offset"] for r in seen] == ["0", "6", "6"]
        assert {r.url.params["wait"] for r in seen} == {str(commands.LOG_WAIT_S)}

    def test_without_follow_it_stops_at_the_end_of_what_is_stored(self, monkeypatch):
        pages = iter(
            [
                {"offset": 0, "next_offset": 4, "data": "abc\n", "complete": False},
                {"offset": 4, "next_offset": 4, "data": "", "complete": False},
            ]
        )
        seen = fake_server(monkeypatch, lambda request: httpx.Response(200, json=next(pages)))

        result = run("logs", "job-1")

        assert result.stdout == "abc\n"
        assert [r.url.params["wait"] for r in seen] == ["0", "0"]


class TestSecrets:
    VALUE = "hf_cli-secret-value-9f8e7d"

    def test_set_from_standard_input_list_and_remove_and_the_value_is_never_printed(self, logged_in, renter):
        from marketplace.accounts.models import Secret
        from marketplace.kernel import sealing

        set_result = run("secret", "set", "hf-token", input=self.VALUE + "\n")
        listed = run("secret", "list")
        as_json = run("--json", "secret", "list")

        assert set_result.exit_code == 0, set_result.output
        assert sealing.unseal(Secret.objects.get(owner=renter, name="hf-token").sealed) == self.VALUE  # echo's \n gone
        assert "hf-token" in listed.stdout
        assert [row["name"] for row in json.loads(as_json.stdout)] == ["hf-token"]
        for result in (set_result, listed, as_json):
            assert self.VALUE not in result.output

        removed = run("secret", "rm", "hf-token")
        assert removed.exit_code == 0, removed.output
        assert not Secret.objects.exists()

    def test_set_from_a_file_keeps_it_as_is(self, logged_in, renter, tmp_path):
        from marketplace.accounts.models import Secret
        from marketplace.kernel import sealing

        path = tmp_path / "token"
        path.write_text("line one\nline two\n")

        assert run("secret", "set", "multi", "--from-file", str(path)).exit_code == 0
        assert sealing.unseal(Secret.objects.get(name="multi").sealed) == "line one\nline two\n"

    def test_bad_names_and_empty_values_get_one_readable_line(self, logged_in):
        bad_name = run("secret", "set", "Not OK", input="x")
        empty = run("secret", "set", "ok", input="")
        missing = run("secret", "rm", "never-set")

        assert bad_name.exit_code == 1 and "name" in bad_name.stderr
        assert empty.exit_code == 1 and "cannot be empty" in empty.stderr
        assert missing.exit_code == 1 and "404" in missing.stderr

    def test_a_job_file_names_its_secrets_and_env(self, logged_in, renter, tmp_path):
        run("secret", "set", "hf-token", input=self.VALUE)
        path = tmp_path / "job.yaml"
        path.write_text(JOB_YAML + 'env: {EPOCHS: "3"}\nsecrets: {HF_TOKEN: hf-token}\n')

        result = run("submit", str(path))

        assert result.exit_code == 0, result.output
        job = Job.objects.get(renter=renter)
        assert (job.env, job.secrets) == ({"EPOCHS": "3"}, {"HF_TOKEN": "hf-token"})


class TestTemplates:
    def test_save_list_show_and_submit_from_a_template_with_overrides(self, logged_in, renter, job_file):
        saved = run("template", "save", "train", str(job_file))
        listed = run("template", "list")
        shown = run("template", "show", "train")
        submitted = run("submit", "-t", "train", "--set", "gpu_count=2", "--set", "env={EPOCHS: '5'}")

        assert saved.exit_code == 0, saved.output
        assert "train" in listed.stdout and "ghcr.io/acme/train:1.0" in listed.stdout
        assert json.loads(shown.stdout)["command"] == ["python", "train.py", "--epochs", "3"]
        assert submitted.exit_code == 0, submitted.output
        job = Job.objects.get(renter=renter)
        assert (job.name, job.gpu_count, job.env, job.jurisdictions) == ("fine-tune", 2, {"EPOCHS": "5"}, ["EU"])

        assert run("template", "rm", "train").exit_code == 0
        assert "No templates." in run("template", "list").stdout

    def test_submit_needs_a_file_or_a_template_and_a_bad_set_is_one_readable_line(self, logged_in):
        nothing = run("submit")
        bad_set = run("submit", "-t", "train", "--set", "gpu_count")
        unknown = run("submit", "-t", "never-saved")

        assert nothing.exit_code == 2 and "--template" in nothing.output
        assert bad_set.exit_code == 1 and "FIELD=VALUE" in bad_set.stderr
        assert unknown.exit_code == 1 and "never-saved" in unknown.stderr


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The renter's storage: a real S3-compatible server on loopback, with a bucket."""
    from marketplace.devtools.s3 import REGION, s3_server

    with s3_server(tmp_path_factory.mktemp("s3") / "s3.log") as s3:
        s3.client().create_bucket(Bucket="mine", CreateBucketConfiguration={"LocationConstraint": REGION})
        yield s3


@pytest.fixture
def storage_env(store, monkeypatch, settings, tmp_path):
    """The renter's credentials for `store`, and a server that takes data from it (it is on loopback)."""
    from marketplace.devtools.s3 import REGION

    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "no-aws-file"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", store.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "renter-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "renter-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    settings.JOB_DATA_PRIVATE_HOSTS = [store.host]
    return store


DATA_JOB_YAML = (
    JOB_YAML
    + """\
inputs: [{url: s3://mine/in/corpus.txt, path: corpus.txt, jurisdiction: DE}]
outputs: [{url: s3://mine/out/counts.txt, path: counts.txt, jurisdiction: DE}]
"""
)


def output_uploaded(job, owner, content: bytes) -> None:
    """The job ran on a shed whose agent uploaded `content` as its output counts.txt and said so."""
    import hashlib

    from marketplace.jobs.placement import job_place
    from marketplace.jobs.services import allocation_staged
    from tests.conftest import unit_online

    unit_online(owner, name="shed", country="DE", gpus=1)
    allocation = job_place(job_id=job.pk)
    assert httpx.put(job.outputs[0]["url"], content=content).status_code == 200
    files = [{"path": "counts.txt", "size": len(content), "sha256": hashlib.sha256(content).hexdigest()}]
    allocation_staged(allocation=allocation, phase="out", ok=True, reason="", detail="", files=files, seconds=0.1)


class TestStorage:
    def test_s3_urls_are_presigned_with_the_renters_credentials_get_for_inputs_put_for_outputs(
        self, logged_in, storage_env, tmp_path, renter
    ):
        storage_env.client().put_object(Bucket="mine", Key="in/corpus.txt", Body=b"a shed in a garden")
        (tmp_path / "data.yaml").write_text(DATA_JOB_YAML)

        result = run("submit", str(tmp_path / "data.yaml"))

        assert result.exit_code == 0, result.output
        job = Job.objects.get(renter=renter)
        [given], [taken] = job.inputs, job.outputs
        assert given["url"].startswith(f"{storage_env.endpoint}/mine/in/corpus.txt?")
        assert "X-Amz-Signature=" in given["url"] and "renter-secret" not in json.dumps([given, taken])
        assert httpx.get(given["url"]).content == b"a shed in a garden"  # good for a GET
        assert httpx.put(taken["url"], content=b"3 a").status_code == 200  # and this one for a PUT
        assert storage_env.client().get_object(Bucket="mine", Key="out/counts.txt")["Body"].read() == b"3 a"

    def test_without_storage_credentials_nothing_is_submitted_and_the_cli_says_what_to_set(
        self, logged_in, storage_env, monkeypatch, tmp_path, renter
    ):
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        (tmp_path / "data.yaml").write_text(DATA_JOB_YAML)

        result = run("submit", str(tmp_path / "data.yaml"))

        assert result.exit_code == 1
        assert "AWS_ACCESS_KEY_ID" in result.stderr
        assert not Job.objects.filter(renter=renter).exists()

    def test_a_template_keeps_no_s3_url(self, logged_in, storage_env, tmp_path):
        (tmp_path / "data.yaml").write_text(DATA_JOB_YAML)

        result = run("template", "save", "counts", str(tmp_path / "data.yaml"))

        assert result.exit_code == 1
        assert "presigned as a job is submitted" in result.stderr

    def test_output_get_keeps_the_file_only_while_it_is_what_the_shed_uploaded(
        self, logged_in, storage_env, tmp_path, renter, owner, monkeypatch
    ):
        (tmp_path / "data.yaml").write_text(DATA_JOB_YAML)
        assert run("submit", str(tmp_path / "data.yaml")).exit_code == 0
        job = Job.objects.get(renter=renter)
        output_uploaded(job, owner, b"4 the\n3 shed\n")
        monkeypatch.chdir(tmp_path)

        listed = run("output", "list", str(job.pk))
        fetched = run("output", "get", str(job.pk), "counts.txt")

        assert "counts.txt" in listed.stdout and " 13 " in listed.stdout
        assert fetched.exit_code == 0, fetched.output
        assert (tmp_path / "counts.txt").read_bytes() == b"4 the\n3 shed\n"

        # Someone changed the object since: the CLI says so and writes nothing.
        storage_env.client().put_object(Bucket="mine", Key="out/counts.txt", Body=b"9 forged\n")
        changed = run("output", "get", str(job.pk), "counts.txt", "-o", str(tmp_path / "again.txt"))

        assert changed.exit_code == 1
        assert "the object changed since; nothing written" in changed.stderr
        assert sorted(p.name for p in tmp_path.iterdir() if "again" in p.name) == []

    def test_output_get_refuses_what_is_not_there(self, logged_in, storage_env, tmp_path, renter, owner, monkeypatch):
        (tmp_path / "data.yaml").write_text(DATA_JOB_YAML)
        assert run("submit", str(tmp_path / "data.yaml")).exit_code == 0
        job = Job.objects.get(renter=renter)
        monkeypatch.chdir(tmp_path)

        unknown = run("output", "get", str(job.pk), "model.bin")
        not_yet = run("output", "get", str(job.pk), "counts.txt")
        output_uploaded(job, owner, b"4 the\n")
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # credentials for another store
        elsewhere = run("output", "get", str(job.pk), "counts.txt")

        assert unknown.exit_code == 1 and "declared no output 'model.bin' (its outputs: counts.txt)" in unknown.stderr
        assert not_yet.exit_code == 1 and "has not uploaded it" in not_yet.stderr
        assert elsewhere.exit_code == 1 and "is not an object of the store your credentials reach" in elsewhere.stderr
        assert not (tmp_path / "counts.txt").exists()

    def test_residency_prints_where_the_job_ran_and_what_moved(self, logged_in, storage_env, tmp_path, renter, owner):
        (tmp_path / "data.yaml").write_text(DATA_JOB_YAML)
        assert run("submit", str(tmp_path / "data.yaml")).exit_code == 0
        job = Job.objects.get(renter=renter)
        output_uploaded(job, owner, b"4 the\n")

        text = run("residency", str(job.pk)).stdout
        record = json.loads(run("--json", "residency", str(job.pk)).stdout)

        assert f"Job {job.pk}" in text and "Rules       jurisdictions EU" in text
        assert f"Output      counts.txt to {storage_env.endpoint}/mine/out/counts.txt (DE): 6 bytes" in text
        assert "Input       corpus.txt from" in text and "not moved" in text
        assert record["data"]["outputs"]["declared"][0]["endpoint"] == f"{storage_env.endpoint}/mine/out/counts.txt"
