"""`shedshare`: log in, search offers, submit and follow jobs, keep secrets, read the balance."""

import json
import os
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from time import sleep
from typing import Any

import click

from marketplace.cli import config, render, storage
from marketplace.cli.client import VERSION, CliError, RenterClient, Unreachable
from marketplace.cli.jobfile import load_spec, parse_overrides

DEFAULT_URL = "http://127.0.0.1:8000"
FINAL_STATES = ("succeeded", "failed", "cancelled", "lost")
JOB_STATES = ("queued", "placed", "starting", "running", *FINAL_STATES)
# Waits before resending a submit that got no answer; the Idempotency-Key makes the resend safe.
SUBMIT_RETRY_DELAYS_S = (1.0, 3.0)
LOG_WAIT_S = 20


class Group(click.Group):
    """Turns every API and configuration failure into one readable line on stderr and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (CliError, config.NotLoggedIn) as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=Group)
@click.version_option(VERSION, prog_name="shedshare")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON instead of tables, for scripts.")
@click.pass_context
def main(ctx: click.Context, as_json: bool) -> None:
    """Shedshare renter CLI. Credentials: `shedshare login`, or SHEDSHARE_URL and SHEDSHARE_API_KEY."""
    ctx.obj = as_json


def _client() -> RenterClient:
    credentials = config.load()
    return RenterClient(credentials.url, credentials.key)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


@main.command()
@click.option("--url", help=f"Server base URL [default: $SHEDSHARE_URL, the saved one, else {DEFAULT_URL}].")
@click.option("--key", help="API key (shs_live_…); asked for when left out.")
@click.pass_obj
def login(as_json: bool, url: str | None, key: str | None) -> None:
    """Check an API key against the server and save both to the config file (mode 0600)."""
    path = config.default_path()
    url = url or os.environ.get("SHEDSHARE_URL") or config.read(path).get("url") or DEFAULT_URL
    key = (key or click.prompt("API key", hide_input=True)).strip()
    with RenterClient(url, key) as client:
        balance = client.balance()
    config.save(path, config.Credentials(url=url, key=key))
    if as_json:
        _print_json({"url": url, "config": str(path), "balance": balance})
    else:
        click.echo(f"Logged in to {url}; balance {balance['balance']} {balance['currency']}. Saved to {path}")


@main.command()
@click.argument("query", default="")
@click.option("--sort", help="Field to sort on, e.g. price_per_gpu_hour or -reliability.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Most offers to show.")
@click.pass_obj
def offers(as_json: bool, query: str, sort: str | None, limit: int) -> None:
    """Search offers, e.g. 'gpu_name in [H100,B200] country in [DE,FR] price_per_gpu_hour<=2.5'."""
    with _client() as client:
        found = client.offers(query, sort=sort, limit=limit)
    if as_json:
        _print_json(found)
    else:
        render.table(found, render.OFFER_COLUMNS, empty="No offers match.")


@main.command()
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False), required=False)
@click.option("-t", "--template", help="Start from this saved template (see `shedshare template`).")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Set one field (a YAML value: gpu_count=2, env={EPOCHS: '3'}); after SPEC_FILE's, repeatable.",
)
@click.option("--wait", is_flag=True, help="Follow the job until it ends; exit 0 only if it succeeded.")
@click.option(
    "--idempotency-key",
    default=lambda: str(uuid.uuid4()),
    show_default="a random one",
    help="Sent as Idempotency-Key: the same key never submits twice.",
)
@click.option("--interval", type=click.FloatRange(min=0), default=2.0, show_default=True, help="Seconds between polls.")
@click.pass_context
def submit(
    ctx: click.Context,
    spec_file: str | None,
    template: str | None,
    overrides: tuple[str, ...],
    wait: bool,
    idempotency_key: str,
    interval: float,
) -> None:
    """Submit the job described in SPEC_FILE (YAML or JSON; see the README), or by a saved
    template with SPEC_FILE's fields and --set's over it."""
    if spec_file is None and template is None:
        raise click.UsageError("name a job file, a --template, or both")
    spec = {**(load_spec(spec_file) if spec_file else {}), **parse_overrides(overrides)}
    if template is not None:
        spec["template"] = template
    if storage.uses_s3(spec):
        spec = storage.presign_spec(spec, storage.Storage())
    with _client() as client:
        job = _submit(client, spec, idempotency_key)
        if not wait:
            if ctx.obj:
                _print_json(job)
            else:
                click.echo(f"Submitted job {job['id']} ({job['state']})")
                for line in render.services(job):
                    click.echo(line)
            return
        click.echo(f"Submitted job {job['id']}", err=ctx.obj)
        job = _follow(client, job, interval, err=ctx.obj)
    if ctx.obj:
        _print_json(job)
    ctx.exit(0 if job["state"] == "succeeded" else 1)


def _submit(client: RenterClient, spec: dict, idempotency_key: str) -> dict:
    for delay in (*SUBMIT_RETRY_DELAYS_S, None):
        try:
            return client.submit(spec, idempotency_key=idempotency_key)
        except Unreachable as exc:
            if delay is None:
                hint = f"Retry with --idempotency-key {idempotency_key} to avoid a duplicate."
                raise Unreachable(f"{exc}\n  {hint}") from None
            sleep(delay)
    raise AssertionError("unreachable")


def _follow(client: RenterClient, job: dict, interval: float, *, err: bool) -> dict:
    """Poll the job, printing a line whenever its state or why-pending changes, until it ends."""
    shown = None
    while True:
        line = render.job_line(job)
        if line != shown:
            click.echo(f"{datetime.now(UTC):%H:%M:%S}  {line}", err=err)
            shown = line
        if job["state"] in FINAL_STATES:
            return job
        sleep(interval)
        job = client.job(job["id"])


@main.command()
@click.option("--state", type=click.Choice(JOB_STATES), help="Only jobs in this state.")
@click.pass_obj
def jobs(as_json: bool, state: str | None) -> None:
    """List your jobs, newest first."""
    with _client() as client:
        found = client.jobs(state=state)
    if as_json:
        _print_json(found)
    else:
        render.table(found, render.JOB_COLUMNS, empty="No jobs.")


@main.command()
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job's log is complete.")
@click.option("--offset", type=click.IntRange(min=0), default=0, help="Start at this byte offset.")
@click.pass_obj
def logs(as_json: bool, job_id: str, follow: bool, offset: int) -> None:
    """Print a job's log; with -f, follow it until the job ends. --json prints one JSON page per line."""
    with _client() as client:
        while True:
            page = client.logs(job_id, offset=offset, wait_s=LOG_WAIT_S if follow else 0)
            if as_json:
                click.echo(json.dumps(page))
            elif page.get("data"):
                click.echo(page["data"], nl=False)
            next_offset = page.get("next_offset", offset)
            if page.get("complete") or (next_offset == offset and not follow):
                return
            if next_offset == offset:
                sleep(1)  # a server that did not hold the request open for `wait`
            offset = next_offset


@main.command()
@click.argument("job_id")
@click.pass_obj
def cancel(as_json: bool, job_id: str) -> None:
    """Cancel a job."""
    with _client() as client:
        job = client.cancel(job_id)
    if as_json:
        _print_json(job)
    else:
        click.echo(render.job_line(job))


@main.command()
@click.pass_obj
def balance(as_json: bool) -> None:
    """Show your wallet balance."""
    with _client() as client:
        wallet = client.balance()
    if as_json:
        _print_json(wallet)
    else:
        click.echo(f"{wallet['balance']} {wallet['currency']}")


@main.group()
def secret() -> None:
    """Keep secrets (API tokens, registry passwords) that jobs name in `secrets:`."""


@secret.command("set")
@click.argument("name")
@click.option(
    "--from-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Read the value from this file (as is). Else from standard input, or asked for without echo.",
)
@click.pass_obj
def secret_set(as_json: bool, name: str, from_file: str | None) -> None:
    """Create or replace the secret NAME. The value is never an argument (a shell's history and
    the process list would keep it): it is asked for, piped in, or read from a file."""
    if from_file:
        try:
            with open(from_file, encoding="utf-8") as source:
                value = source.read()
        except (OSError, UnicodeError) as exc:
            raise click.ClickException(f"cannot read {from_file}: {exc}") from None
    elif sys.stdin.isatty():
        value = click.prompt(f"Value of {name}", hide_input=True, confirmation_prompt=True)
    else:
        value = sys.stdin.read()
        value = value[:-1] if value.endswith("\n") else value  # what `echo` adds
    if not value:
        raise click.ClickException("a secret cannot be empty")
    with _client() as client:
        stored = client.secret_set(name, value)
    if as_json:
        _print_json(stored)
    else:
        click.echo(f"Secret {stored['name']} set; name it in a job's secrets: {{VARIABLE: {stored['name']}}}.")


@secret.command("list")
@click.pass_obj
def secret_list(as_json: bool) -> None:
    """List your secrets' names (a value is never shown again)."""
    with _client() as client:
        found = client.secrets()
    if as_json:
        _print_json(found)
    else:
        render.table(found, render.SECRET_COLUMNS, empty="No secrets.")


@secret.command("rm")
@click.argument("name")
@click.pass_obj
def secret_rm(as_json: bool, name: str) -> None:
    """Delete the secret NAME (a job naming it that has not started then fails)."""
    with _client() as client:
        client.secret_delete(name)
    if as_json:
        _print_json({"deleted": name})
    else:
        click.echo(f"Secret {name} deleted.")


@main.group()
def template() -> None:
    """Save job specs by name, and submit from them (`shedshare submit -t NAME`)."""


@template.command("save")
@click.argument("name")
@click.argument("spec_file", type=click.Path(exists=True, dir_okay=False))
@click.pass_obj
def template_save(as_json: bool, name: str, spec_file: str) -> None:
    """Save SPEC_FILE's fields (all of a job or some) as the template NAME, replacing it if it exists."""
    spec = load_spec(spec_file)
    if storage.uses_s3(spec):
        raise click.ClickException(
            "s3:// URLs are presigned as a job is submitted, and a template is kept for later: "
            "give them in the job file or with --set when you submit from it"
        )
    with _client() as client:
        saved = client.template_save(name, spec)
    if as_json:
        _print_json(saved)
    else:
        click.echo(f"Template {saved['name']} saved; submit from it with: shedshare submit -t {saved['name']}")


@template.command("list")
@click.pass_obj
def template_list(as_json: bool) -> None:
    """List your templates."""
    with _client() as client:
        found = client.templates()
    if as_json:
        _print_json(found)
    else:
        render.table(found, render.TEMPLATE_COLUMNS, empty="No templates.")


@template.command("show")
@click.argument("name")
def template_show(name: str) -> None:
    """Print the template NAME's fields as JSON."""
    with _client() as client:
        _print_json(client.template(name)["spec"])


@template.command("rm")
@click.argument("name")
@click.pass_obj
def template_rm(as_json: bool, name: str) -> None:
    """Delete the template NAME."""
    with _client() as client:
        client.template_delete(name)
    if as_json:
        _print_json({"deleted": name})
    else:
        click.echo(f"Template {name} deleted.")


@main.command()
@click.argument("job_id")
@click.pass_obj
def residency(as_json: bool, job_id: str) -> None:
    """Where the job ran and where its data came from and went, with the audit events behind it."""
    with _client() as client:
        record = client.residency(job_id)
    if as_json:
        _print_json(record)
    else:
        for line in render.residency(record):
            click.echo(line)


@main.group()
def output() -> None:
    """What a job's shed uploaded: list the outputs, fetch one and check it against the shed's record."""


@output.command("list")
@click.argument("job_id")
@click.pass_obj
def output_list(as_json: bool, job_id: str) -> None:
    """The job's declared outputs, with the size and SHA-256 of each upload."""
    with _client() as client:
        outputs = storage.job_outputs(client.residency(job_id))
    if as_json:
        _print_json(outputs)
    else:
        render.table(outputs, render.OUTPUT_COLUMNS, empty="The job declared no outputs.")


@output.command("get")
@click.argument("job_id")
@click.argument("path")
@click.option("-o", "--out", "target", type=click.Path(dir_okay=False), help="File to write [default: PATH's name].")
@click.pass_obj
def output_get(as_json: bool, job_id: str, path: str, target: str | None) -> None:
    """Fetch the output PATH from your storage (s3://, with your credentials) and keep it only if
    its size and SHA-256 are those the job's shed recorded as it uploaded it."""
    with _client() as client:
        outputs = storage.job_outputs(client.residency(job_id))
    found = next((item for item in outputs if item["path"] == path), None)
    if found is None:
        names = ", ".join(item["path"] for item in outputs) or "none"
        raise click.ClickException(f"job {job_id} declared no output {path!r} (its outputs: {names})")
    uploaded = found["uploaded"]
    if uploaded is None:
        raise click.ClickException(f"{path}: the job's shed has not uploaded it (see `shedshare residency {job_id}`)")
    store = storage.Storage()
    url = store.presign("GET", *store.object_of(found["endpoint"]))
    destination = Path(target or Path(path).name)
    storage.download(url, destination, size=uploaded["size"], sha256=uploaded["sha256"])
    if as_json:
        _print_json({"path": path, "file": str(destination), "size": uploaded["size"], "sha256": uploaded["sha256"]})
    else:
        click.echo(f"{destination}: {uploaded['size']} bytes, SHA-256 {uploaded['sha256']} as the shed uploaded it")


@main.command()
@click.argument("job_id")
@click.argument("port", type=click.IntRange(1, 65535))
@click.option("--local-port", type=click.IntRange(0, 65535), default=None, help="Local port [default: PORT; 0: any].")
@click.option("--address", default="127.0.0.1", show_default=True, help="Local address to listen on.")
def forward(job_id: str, port: int, local_port: int | None, address: str) -> None:
    """Reach PORT of your running job JOB_ID at a local port (SSH, a notebook, a debugger): each
    connection goes through the marketplace and the shed's own connection; Ctrl-C stops."""
    import asyncio

    from marketplace.cli.forward import serve

    credentials = config.load()

    def ready(bound: int) -> None:
        click.echo(f"Forwarding {address}:{bound} -> job {job_id} port {port} (Ctrl-C to stop)", err=True)

    def refused(why: str) -> None:
        click.echo(f"shedshare forward: a connection was refused: {why}", err=True)

    try:
        asyncio.run(serve(credentials.url, credentials.key, job_id, port, port if local_port is None else local_port,
                          ready=ready, refused=refused, bind=address))  # fmt: skip
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {address}:{local_port or port}: {exc.strerror}") from None
    except KeyboardInterrupt:
        pass
