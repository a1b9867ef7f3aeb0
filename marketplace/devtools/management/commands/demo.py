import json
import os
import signal
import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from billing.services import wallet_credit_promotional
from marketplace.accounts.models import ApiKey
from marketplace.accounts.services import api_key_create, api_key_revoke
from marketplace.devtools import devstack, s3
from nodes.models import Unit
from nodes.services import enrolment_token_issue, unit_register

PASSWORD = "shedshare-demo"  # noqa: S105 - demo accounts exist only with DEBUG on
UNITS = [
    {"name": "Munich garden shed", "country": "DE", "subdivision": "DE-BY", "simulate": "8xH100-80GB"},
    {"name": "Lyon orchard shed", "country": "FR", "subdivision": "FR-ARA", "simulate": "4xL40S-48GB"},
]
DEMO_CREDIT_MICROS = 100_000_000
# The renter's storage in the demo: an S3-compatible server on loopback (moto) whose bucket in
# Frankfurt holds a text to work on; the README's data walk reads it and writes beside it.
BUCKET = "demo-de"
CORPUS_KEY = "corpus.txt"
CORPUS = """A shed in a garden holds eight GPUs and a pump for their water.
The owner sets quiet hours, the renter sets a jurisdiction, and the shed keeps both.
Data comes in before the job starts and goes out after it ends; the job has no network.
"""


class Command(BaseCommand):
    help = "Run the whole marketplace on this machine: web, Celery worker and beat, two simulated sheds."

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--s3-port", type=int, default=None, help="the demo's S3 store (default: --port + 1)")

    def handle(self, *args, port: int, s3_port: int | None, **options):
        if not settings.DEBUG:
            raise CommandError("The demo creates accounts with a known password; run it with DEBUG=true only.")
        call_command("migrate", verbosity=0)
        owner, renter = self._accounts()
        s3_port = s3_port or port + 1
        store = s3.S3.on_port(s3_port)
        # The store is on loopback, where neither the server nor the sheds accept data from
        # unless told: it is the demo's one private data host.
        env = {**os.environ, "JOB_DATA_PRIVATE_HOSTS": store.host, "SHEDSHARE_AGENT_DATA_PRIVATE_HOSTS": store.host}
        env["PROMETHEUS_MULTIPROC_DIR"] = devstack.metrics_dir(settings.DATA_DIR / "demo-metrics")
        stack = devstack.Stack(env=env, log_dir=settings.DATA_DIR / "demo-logs")
        base_url = f"http://127.0.0.1:{port}"
        try:
            s3_process = stack.start("s3", s3.server_argv(s3_port))
            s3.wait_ready(store.endpoint, alive=lambda: s3_process.poll() is None)
            self._seed(store)
            stack.start("web", devstack.web_argv(port))
            stack.start("worker", devstack.worker_argv(), LIVENESS_PROBE_URL=f"{base_url}/healthz")
            stack.start("beat", devstack.beat_argv(settings.DATA_DIR / "demo-beat-schedule"))
            devstack.wait_http(f"{base_url}/api/schema/")
            for number, spec in enumerate(UNITS, start=1):
                self._agent_start(stack, base_url, owner, number, spec)
            for earlier in ApiKey.objects.filter(user=renter, name="demo", revoked_at__isnull=True):
                api_key_revoke(key=earlier)  # each run's key replaces the last: keys per account are capped
            _, api_key = api_key_create(user=renter, name="demo")
            self._announce(base_url, api_key, stack, store)
            self._wait(stack)
        finally:
            self.stdout.write("Stopping…")
            stack.stop_all()

    def _accounts(self):
        users = get_user_model()
        admin, _ = users.objects.get_or_create(username="admin", defaults={"is_staff": True, "is_superuser": True})
        owner, _ = users.objects.get_or_create(username="owner")
        renter, _ = users.objects.get_or_create(username="renter")
        for user in (admin, owner, renter):
            user.set_password(PASSWORD)
            user.save()
        wallet_credit_promotional(user=renter, amount_micros=DEMO_CREDIT_MICROS, key=f"demo-credit:{renter.pk}")
        return owner, renter

    def _seed(self, store: s3.S3) -> None:
        client = store.client()
        client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": s3.REGION})
        client.put_object(Bucket=BUCKET, Key=CORPUS_KEY, Body=CORPUS.encode())

    def _agent_start(self, stack, base_url: str, owner, number: int, spec: dict) -> None:
        unit = Unit.objects.filter(owner=owner, name=spec["name"]).first()
        if unit is None:
            unit, token = unit_register(
                owner=owner, name=spec["name"], country=spec["country"], subdivision=spec["subdivision"]
            )
        else:
            token = enrolment_token_issue(unit=unit)
        agent_dir = settings.DATA_DIR / f"demo-agent-{number}"
        config = str(agent_dir / "agent.json")
        enrol = ("enrol", "--url", base_url, "--token", token, "--config", config, "--country", spec["country"])
        enrolled = stack.run(devstack.agent_argv(*enrol))
        if enrolled.returncode != 0:
            raise CommandError(f"Agent {number} could not enrol: {enrolled.stderr or enrolled.stdout}")
        stack.start(
            f"agent-{number}",
            devstack.agent_argv(
                "run", "--config", config, "--simulate", spec["simulate"], "--work-dir", str(agent_dir / "work"),
                "--usage-interval", "5", "--dev-runtime",
                # Ctrl-C stops the jobs too (reported as drained), so none outlives the demo.
                "--drain", "stop",
            ),
        )  # fmt: skip

    def _announce(self, base_url: str, api_key: str, stack, store: s3.S3) -> None:
        job = {
            "name": "hello-shed",
            "image": "docker.io/library/python:3.12-slim",
            "command": ["sh", "-c", "echo hello from a shed; sleep 5; echo done"],
            "gpu_count": 1,
            "jurisdictions": ["DE"],
            "max_price_per_gpu_hour": "3.00",
        }
        auth = f'-H "Authorization: Bearer {api_key}"'
        lines = [
            "",
            "Shedshare is running on the embedded default (SQLite, file-system broker).",
            f"  Owner portal   {base_url}/portal/   (owner / {PASSWORD})",
            f"  Admin          {base_url}/admin/    (admin / {PASSWORD})",
            f"  API docs       {base_url}/api/docs/",
            f"  Renter API key {api_key}   (user renter / {PASSWORD}, $100 demo credit)",
            f"  Logs           {stack.log_dir}",
            "",
            "Submit a job that must run in Germany:",
            f"  curl -s {auth} -H 'Content-Type: application/json' \\",
            f"       -d '{json.dumps(job)}' {base_url}/api/v1/jobs",
            "Follow it (state, placement, usage, cost):",
            f"  curl -s {auth} {base_url}/api/v1/jobs",
            "Your balance:",
            f"  curl -s {auth} {base_url}/api/v1/balance",
            "",
            f"Your storage: an S3-compatible store; s3://{BUCKET}/{CORPUS_KEY} is in Frankfurt (DE). For the CLI:",
            f"  export SHEDSHARE_URL={base_url} SHEDSHARE_API_KEY={api_key}",
            f"  export AWS_ENDPOINT_URL={store.endpoint} AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo"
            f" AWS_DEFAULT_REGION={s3.REGION}",
            "",
            "Press Ctrl-C to stop.",
        ]
        self.stdout.write("\n".join(lines))

    def _wait(self, stack) -> None:
        stopping = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stopping.append(True))
        while not stopping:
            for name, process in list(stack.processes.items()):
                if process.poll() is not None:
                    raise CommandError(f"{name} exited with {process.returncode}; see {stack.log_dir}/{name}.log")
            time.sleep(0.5)
