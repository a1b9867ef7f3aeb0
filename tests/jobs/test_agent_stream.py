"""The agents' streams (marketplace/jobs/agent_stream/): the ASGI application driven as a server
would drive it, on the test database, with its hub's loops running."""

import asyncio
import gc
import json
import sys
import threading
from collections import Counter
from dataclasses import asdict
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from asgiref.testing import ApplicationCommunicator
from django.core.cache import cache
from django.db import connections
from django.utils import timezone

from marketplace.asgi import application
from marketplace.jobs.agent_stream import server
from marketplace.jobs.models import Allocation, UsageSample
from marketplace.jobs.placement import job_place
from marketplace.jobs.services import job_cancel
from marketplace.kernel.models import AuditEvent
from nodes import streams
from nodes.agent import protocol
from nodes.models import StreamServer, Unit, UnitNudge
from nodes.services import units_mark_unresponsive
from tests.conftest import allocation_since, gpus_make, job_make, unit_online

pytestmark = pytest.mark.django_db(transaction=True)

PATH = f"{protocol.API_PREFIX}/{protocol.STREAM}"
WAIT_S = 10  # generous: the hub's loops run every 0.1–2 s; a busy machine may be slow


@pytest.fixture(autouse=True)
def fresh_hub(settings):
    settings.STREAM_NUDGE_POLL_S = 0.02
    settings.STREAM_LEASE_RENEW_S = 0.2
    server.HUB = None
    cache.clear()
    yield
    if server.HUB is not None:
        server.HUB.release()  # its LISTEN connection, before the test database goes
    server.HUB = None


def scope(credential: str, path: str = PATH) -> dict:
    return {
        "type": "websocket",
        "path": path,
        "scheme": "ws",
        "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {credential}".encode())],
        "client": ("203.0.113.9", 50000),
        "server": ("testserver", 80),
        "subprotocols": [],
    }


class Agent:
    """One stream, as an agent sees it."""

    def __init__(self, credential: str, path: str = PATH):
        self.wire = ApplicationCommunicator(application, scope(credential, path))
        self.calls = 0
        self.pushes: list[dict] = []
        self.closed: int | None = None

    async def connect(self) -> dict:
        await self.wire.send_input({"type": "websocket.connect"})
        accepted = await self.wire.receive_output(WAIT_S)
        assert accepted["type"] == "websocket.accept", accepted
        return await self.push("hello")

    async def frame(self) -> dict:
        message = await self.wire.receive_output(WAIT_S)
        if message["type"] == "websocket.close":
            self.closed = message.get("code")
            return {"closed": self.closed}
        return json.loads(message["text"])

    async def push(self, kind: str) -> dict:
        """The next push of this kind (replies and other pushes before it are kept)."""
        for pushed in self.pushes:
            if pushed["push"] == kind:
                self.pushes.remove(pushed)
                return pushed["body"]
        while True:
            frame = await self.frame()
            assert "closed" not in frame, f"closed with {frame['closed']} while waiting for a {kind} push"
            if frame.get("push") == kind:
                return frame["body"]
            self.pushes.append(frame)

    async def call(self, path: str, body: dict) -> dict:
        self.calls += 1
        call_id = self.calls
        await self.wire.send_input({"type": "websocket.receive", "text": json.dumps(
            {"id": call_id, "method": "POST", "path": path, "body": body})})  # fmt: skip
        while True:
            frame = await self.frame()
            assert "closed" not in frame, frame
            if frame.get("re") == call_id:
                return frame
            self.pushes.append(frame)

    async def beat(self, running=(), **gpu_changes) -> dict:
        gpus = [{**asdict(gpu), **gpu_changes} for gpu in gpus_make(2, prefix="GPU-shed")]
        body = {"gpus": gpus, "running": list(running), "agent_version": "test"}
        return await self.call(protocol.HEARTBEAT, body)

    async def disconnect(self, code: int = 1006) -> None:
        await self.wire.send_input({"type": "websocket.disconnect", "code": code})
        await self.wire.wait(WAIT_S)


async def eventually(check, what: str):
    for _ in range(int(WAIT_S / 0.05)):
        if await sync_to_async(check)():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {WAIT_S} s: {what}")


def run(coroutine):
    async def scenario():
        try:
            return await coroutine
        finally:  # the connection of the thread that ran the test's own queries
            await sync_to_async(connections.close_all)()

    return asyncio.run(scenario())


@pytest.fixture
def shed(owner):
    return unit_online(owner, name="shed", gpus=2)


def unit_status(unit) -> str:
    return Unit.objects.values_list("status", flat=True).get(pk=unit.pk)


def test_a_heartbeat_that_changes_nothing_is_answered_from_memory_and_writes_no_row(shed):
    unit, credential = shed

    async def scenario():
        agent = Agent(credential)
        hello = await agent.connect()
        assert hello["heartbeat_interval_s"] == 5
        first = await agent.beat(temperature_c=40)
        assert first["status"] == 200 and first["body"]["status"] == "online"
        stored = await sync_to_async(Unit.objects.values_list("last_heartbeat_at", flat=True).get)(pk=unit.pk)
        for temperature in (41, 42, 43):  # only the telemetry changes
            again = await agent.beat(temperature_c=temperature)
            assert again["status"] == 200 and again["body"]["cancel"] == []
        after = await sync_to_async(Unit.objects.values_list("last_heartbeat_at", flat=True).get)(pk=unit.pk)
        assert after == stored  # no row written for them
        await eventually(
            lambda: [g["temperature_c"] for g in (streams.telemetry_latest([unit.pk]).get(str(unit.pk)) or {})
                     .get("gpus", [])] == [43, 43],
            "the latest readings in the cache",
        )  # fmt: skip
        await agent.disconnect()

    run(scenario())


def test_a_changed_heartbeat_goes_through_in_full(shed):
    unit, credential = shed

    async def scenario():
        agent = Agent(credential)
        await agent.connect()
        await agent.beat()
        stored = await sync_to_async(Unit.objects.values_list("last_heartbeat_at", flat=True).get)(pk=unit.pk)
        changed = await agent.beat(healthy=False)  # a GPU fell ill: capacity changes
        assert changed["status"] == 200
        after = await sync_to_async(Unit.objects.values_list("last_heartbeat_at", flat=True).get)(pk=unit.pk)
        assert after > stored
        advertised = await sync_to_async(lambda: set(unit.slices.values_list("advertised", flat=True)))()
        assert advertised == {False}
        await agent.disconnect()

    run(scenario())


def test_placed_work_is_pushed_and_a_cancel_follows_at_once(shed, renter):
    unit, credential = shed

    async def scenario():
        agent = Agent(credential)
        await agent.connect()
        await agent.beat()
        job = await sync_to_async(job_make)(renter, gpu_count=1)
        await sync_to_async(job_place)(job_id=job.pk)
        assignment = await agent.push("assignment")  # no poll: pushed
        assert assignment["job"]["id"] == str(job.pk)
        allocation_id = assignment["allocation_id"]
        started = await agent.call(protocol.allocation_path(allocation_id, "start"), {})
        assert started["status"] == 200 and started["body"]["state"] == "running"
        await agent.beat(running=[allocation_id])
        await sync_to_async(job_cancel)(job=await sync_to_async(type(job).objects.get)(pk=job.pk), actor="test")
        while True:
            state = await agent.push("state")
            if allocation_id in state["cancel"]:
                break
        await agent.disconnect()

    run(scenario())


def test_calls_are_answered_as_over_http(shed, owner):
    unit, credential = shed
    other, _ = unit_online(owner, name="other", gpus=1)

    async def scenario():
        agent = Agent(credential)
        await agent.connect()
        missing = await agent.call(protocol.allocation_path("00000000-0000-0000-0000-000000000000", "start"), {})
        assert missing["status"] == 404 and missing["body"]["status"] == 404
        invalid = await agent.call(protocol.HEARTBEAT, {"gpus": "many"})
        assert invalid["status"] == 400
        assert (await agent.call("enrol", {"token": "x"}))["status"] == 404  # not over the stream
        await agent.wire.send_input({"type": "websocket.receive", "text": "not json"})
        assert (await agent.frame())["status"] == 400
        await agent.disconnect()

    run(scenario())


def test_a_wrong_credential_is_closed_unauthorised(db):
    async def scenario():
        agent = Agent("shs_node_wrong")
        await agent.wire.send_input({"type": "websocket.connect"})
        assert (await agent.wire.receive_output(WAIT_S))["type"] == "websocket.accept"
        assert (await agent.frame()) == {"closed": protocol.StreamClose.UNAUTHORISED}

    run(scenario())


def test_another_websocket_path_is_refused(shed):
    async def scenario():
        agent = Agent(shed[1], path="/api/v1/elsewhere")
        await agent.wire.send_input({"type": "websocket.connect"})
        assert (await agent.wire.receive_output(WAIT_S))["type"] == "websocket.close"

    run(scenario())


def test_a_dropped_stream_makes_the_unit_suspect_at_once_and_a_new_one_brings_it_back(shed):
    unit, credential = shed

    async def scenario():
        agent = Agent(credential)
        await agent.connect()
        await agent.beat()
        await agent.disconnect(1006)
        assert await sync_to_async(unit_status)(unit) == "suspect"
        again = Agent(credential)
        await again.connect()
        assert (await again.beat())["body"]["status"] == "online"
        await again.disconnect()

    run(scenario())


def test_a_newer_stream_replaces_the_older_without_a_verdict(shed):
    unit, credential = shed

    async def scenario():
        older = Agent(credential)
        await older.connect()
        await older.beat()
        newer = Agent(credential)
        await newer.connect()
        while older.closed is None:
            await older.frame()
        assert older.closed == protocol.StreamClose.REPLACED
        await older.disconnect(protocol.StreamClose.REPLACED)
        assert await sync_to_async(unit_status)(unit) == "online"
        assert (await newer.beat())["status"] == 200
        await newer.disconnect()

    run(scenario())


def test_a_server_shutting_down_leaves_its_units_to_its_lease(shed):
    unit, credential = shed

    async def scenario():
        agent = Agent(credential)
        await agent.connect()
        await agent.beat()
        await agent.disconnect(server.SERVER_SHUTDOWN)
        assert await sync_to_async(unit_status)(unit) == "online"

    run(scenario())


def test_the_sweep_counts_a_unit_seen_while_its_server_renews_the_lease(shed, settings):
    unit, _ = shed
    now = timezone.now()
    long_ago = now - timedelta(minutes=5)
    units_mark_unresponsive(now=now - timedelta(seconds=2))  # the sweep ran just before: no outage
    StreamServer.objects.create(id="server-a", renewed_at=now - timedelta(seconds=1))
    Unit.objects.filter(pk=unit.pk).update(last_heartbeat_at=long_ago, stream_server_id="server-a")
    units_mark_unresponsive(now=now)
    assert unit_status(unit) == "online"
    StreamServer.objects.filter(pk="server-a").update(renewed_at=now - settings.UNIT_SUSPECT_AFTER * 2)
    units_mark_unresponsive(now=now + timedelta(seconds=1))
    assert unit_status(unit) == "suspect"
    StreamServer.objects.filter(pk="server-a").delete()  # a lease pruned: no sign of life at all
    units_mark_unresponsive(now=now + timedelta(seconds=2))
    assert unit_status(unit) == "offline"


def test_the_lease_is_renewed_and_pushes_go_out_while_every_call_thread_is_busy(shed, renter, settings):
    # A reconnecting fleet can keep the agents' call threads busy for minutes: the lease (without
    # which every unit of the server looks silent) and the pushes must not wait behind them.
    settings.STREAM_THREADS = 2
    release = threading.Event()

    async def scenario():
        agent = Agent(shed[1])
        await agent.connect()
        await agent.beat()
        the_hub = server.hub()
        busy = [asyncio.ensure_future(the_hub.db(release.wait, 60)) for _ in range(settings.STREAM_THREADS)]
        try:
            renewed = await sync_to_async(StreamServer.objects.values_list("renewed_at", flat=True).get)(
                pk=the_hub.server_id
            )
            await eventually(
                lambda: StreamServer.objects.filter(pk=the_hub.server_id, renewed_at__gt=renewed).exists(),
                "the lease renewed",
            )
            job = await sync_to_async(job_make)(renter, gpu_count=1)
            await sync_to_async(job_place)(job_id=job.pk)
            assignment = await agent.push("assignment")
            assert assignment["job"]["id"] == str(job.pk)
        finally:
            release.set()
            await asyncio.gather(*busy)

    run(scenario())


def test_placement_takes_a_streamed_unit_as_fresh(shed, renter):
    unit, _ = shed
    StreamServer.objects.create(id="server-a", renewed_at=timezone.now())
    Unit.objects.filter(pk=unit.pk).update(
        last_heartbeat_at=timezone.now() - timedelta(minutes=5), stream_server_id="server-a"
    )
    job = job_make(renter, gpu_count=1)
    job_place(job_id=job.pk)
    assert Allocation.objects.filter(job=job, unit=unit).exists()


def test_a_stream_flooding_calls_is_answered_429_beyond_its_budget(shed, settings):
    settings.STREAM_FRAMES_PER_S = 1  # a burst of 10, then one a second

    async def scenario():
        agent = Agent(shed[1])
        await agent.connect()
        answers = [(await agent.call("nope", {}))["status"] for _ in range(30)]  # far faster than 1 a second
        assert answers[:10] == [404] * 10
        assert 429 in answers[10:]
        await agent.disconnect()

    run(scenario())


def test_a_cancel_right_after_the_start_is_pushed_before_any_heartbeat_names_the_job(shed, renter):
    unit, credential = shed

    async def scenario():
        agent = Agent(credential)
        await agent.connect()
        await agent.beat()
        job = await sync_to_async(job_make)(renter, gpu_count=1)
        await sync_to_async(job_place)(job_id=job.pk)
        allocation_id = (await agent.push("assignment"))["allocation_id"]
        assert (await agent.call(protocol.allocation_path(allocation_id, "start"), {}))["status"] == 200
        await sync_to_async(job_cancel)(job=await sync_to_async(type(job).objects.get)(pk=job.pk), actor="test")
        while allocation_id not in (await agent.push("state"))["cancel"]:
            pass
        await agent.disconnect()

    run(scenario())


def test_a_unit_reconnecting_in_a_loop_is_told_to_try_later(shed, settings, monkeypatch):
    settings.STREAM_CONNECTS_PER_MIN = 2
    monkeypatch.setattr(server, "wall_clock", lambda: 1_800_000_030.0)  # all within one minute

    async def scenario():
        for _ in range(2):
            agent = Agent(shed[1])
            await agent.connect()
            await agent.disconnect(protocol.StreamClose.REPLACED)
        third = Agent(shed[1])
        await third.wire.send_input({"type": "websocket.connect"})
        assert (await third.wire.receive_output(WAIT_S))["type"] == "websocket.accept"
        assert (await third.frame()) == {"closed": protocol.StreamClose.TRY_LATER}

    run(scenario())


def test_a_server_whose_calls_queue_deep_refuses_new_streams_without_touching_the_database(shed, settings):
    settings.STREAM_ADMIT_BACKLOG = 3

    async def scenario():
        held = Agent(shed[1])
        await held.connect()
        await held.beat()
        the_hub = server.hub()
        the_hub.calls_waiting = 3  # as if three calls waited for a thread
        newcomer = Agent(shed[1])
        await newcomer.wire.send_input({"type": "websocket.connect"})
        assert (await newcomer.wire.receive_output(WAIT_S))["type"] == "websocket.accept"
        assert (await newcomer.frame()) == {"closed": protocol.StreamClose.TRY_LATER}
        connection = await sync_to_async(Unit.objects.values_list("stream_connection", flat=True).get)(pk=shed[0].pk)
        assert connection == held_connection(the_hub, shed[0])  # the held stream is still the unit's
        the_hub.calls_waiting = 2  # below the bound: admitted again
        admitted = Agent(shed[1])
        assert (await admitted.connect())["connection"] != connection

    run(scenario())


def held_connection(the_hub, unit) -> str:
    return the_hub.streams[str(unit.pk)].connection


def test_a_newer_stream_on_another_server_closes_the_older_through_the_database(shed):
    """Two connection servers (two hubs, as two processes behind a load balancer would be)."""
    unit, credential = shed

    async def scenario():
        older = Agent(credential)
        await older.connect()
        await older.beat()
        first_server = server.HUB
        server.HUB = None  # the next connection lands on another server
        newer = Agent(credential)
        await newer.connect()
        assert server.HUB is not first_server
        while older.closed is None:
            await older.frame()
        assert older.closed == protocol.StreamClose.REPLACED
        await older.disconnect(protocol.StreamClose.REPLACED)
        stored = await sync_to_async(Unit.objects.values_list("status", "stream_server_id").get)(pk=unit.pk)
        assert stored == ("online", server.HUB.server_id)
        assert (await newer.beat())["status"] == 200
        await newer.disconnect()
        first_server.release()

    run(scenario())


def test_starts_and_finishes_served_over_the_stream_keep_the_heartbeats_cheap(shed, renter):
    # The agent lists a job as running once its start is answered, and stops listing it once its
    # finish is: a beat it sent before the answer reached it (arriving after the call was
    # served) is answered from memory, as is the one after.
    unit, credential = shed

    def last_stored():
        return Unit.objects.values_list("last_heartbeat_at", flat=True).get(pk=unit.pk)

    async def scenario():
        agent = Agent(credential)
        await agent.connect()
        await agent.beat()
        job = await sync_to_async(job_make)(renter, gpu_count=1)
        await sync_to_async(job_place)(job_id=job.pk)
        allocation_id = (await agent.push("assignment"))["allocation_id"]
        before = await sync_to_async(last_stored)()
        assert (await agent.call(protocol.allocation_path(allocation_id, "start"), {}))["status"] == 200
        assert (await agent.beat(running=[]))["status"] == 200  # sent before the start's answer came
        assert (await agent.beat(running=[allocation_id]))["status"] == 200
        finish = {"exit_code": 0, "reason": "exited"}
        assert (await agent.call(protocol.allocation_path(allocation_id, "finish"), finish))["status"] == 200
        assert (await agent.beat(running=[allocation_id]))["status"] == 200  # sent before the finish's answer
        assert (await agent.beat())["status"] == 200
        assert await sync_to_async(last_stored)() == before  # no beat wrote the unit
        await agent.disconnect()

    run(scenario())


def test_a_finish_the_agent_reports_nudges_no_stream_and_leaves_no_stale_cancel(shed, renter):
    # The agent's own report changes nothing it must hear: no nudge (no look, no push), and a
    # cancel it was told of is gone from what its next beats are answered with.
    unit, credential = shed

    def looks():
        return UnitNudge.objects.filter(unit_id=unit.pk, kind=UnitNudge.Kind.LOOK).count()

    async def scenario():
        agent = Agent(credential)
        await agent.connect()
        await agent.beat()
        job = await sync_to_async(job_make)(renter, gpu_count=1)
        await sync_to_async(job_place)(job_id=job.pk)
        allocation_id = (await agent.push("assignment"))["allocation_id"]
        assert (await agent.call(protocol.allocation_path(allocation_id, "start"), {}))["status"] == 200
        await agent.beat(running=[allocation_id])
        await sync_to_async(job_cancel)(job=await sync_to_async(type(job).objects.get)(pk=job.pk), actor="test")
        while allocation_id not in (await agent.push("state"))["cancel"]:
            pass
        before = await sync_to_async(looks)()
        finish = {"exit_code": 143, "reason": "cancelled"}
        assert (await agent.call(protocol.allocation_path(allocation_id, "finish"), finish))["status"] == 200
        assert await sync_to_async(looks)() == before
        reply = await agent.beat()
        assert reply["status"] == 200 and reply["body"]["cancel"] == []
        await agent.disconnect()

    run(scenario())


def test_a_connection_server_tunes_its_interpreter_once(settings):
    thresholds, interval = gc.get_threshold(), sys.getswitchinterval()
    settings.STREAM_TUNE_PROCESS = True
    try:
        server.tune_process()
        assert gc.get_threshold() == settings.STREAM_GC_THRESHOLDS
        assert sys.getswitchinterval() == pytest.approx(settings.STREAM_SWITCH_INTERVAL_S)
        assert gc.get_freeze_count() > 0
        gc.set_threshold(*thresholds)
        server.tune_process()  # once: a second call changes nothing
        assert gc.get_threshold() == thresholds
    finally:
        server._tuned = False
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(interval)


def test_usage_over_the_stream_is_answered_as_over_http(shed, owner, renter, settings):
    settings.USAGE_TOLERANCE_S = 30
    unit, credential = shed
    an_hour_ago = timezone.now() - timedelta(hours=1)
    mine = allocation_since(job_place(job_id=job_make(renter, gpu_count=1).pk), an_hour_ago)
    other, _ = unit_online(owner, name="other", gpus=2)
    theirs = job_place(job_id=job_make(renter, gpu_count=2).pk)  # the shed has one GPU left
    assert (mine.unit_id, theirs.unit_id) == (unit.pk, other.pk)

    def samples(*pairs):
        at = timezone.now().isoformat()
        return {"samples": [{"seq": seq, "gpu_ms": gpu_ms, "recorded_at": at} for seq, gpu_ms in pairs]}

    async def scenario():
        agent = Agent(credential)
        await agent.connect()
        usage = protocol.allocation_path(str(mine.pk), "usage")
        first = await agent.call(usage, samples((1, 1_000), (2, 1_000)))
        assert (first["status"], first["body"]) == (200, {"accepted": 2, "duplicates": 0})
        again = await agent.call(usage, samples((2, 1_000), (3, 1_000)))
        assert (again["status"], again["body"]) == (200, {"accepted": 1, "duplicates": 1})
        invalid = await agent.call(usage, {"samples": [{"seq": 0, "gpu_ms": -1}]})
        assert invalid["status"] == 400 and invalid["body"]["status"] == 400
        foreign = await agent.call(protocol.allocation_path(str(theirs.pk), "usage"), samples((1, 1_000)))
        assert foreign["status"] == 404
        refused = await agent.call(usage, samples((4, 2 * 3_600_000)))
        assert refused["status"] == 422 and refused["body"]["type"] == "/problems/usage-exceeds-gpu-time"
        await agent.disconnect()

    run(scenario())

    assert set(UsageSample.objects.filter(allocation=mine).values_list("seq", flat=True)) == {1, 2, 3}
    assert not UsageSample.objects.filter(allocation=theirs).exists()
    assert AuditEvent.objects.filter(action="unit.usage_refused", subject_id=unit.pk).count() == 1


def held_usage_rounds(monkeypatch) -> tuple[list[list[int]], threading.Event]:
    """The samples of each report of each usage round, as the rounds run; the first round is
    held until the event is set, so that reports wait for the next."""
    rounds, release = [], threading.Event()
    original = server._usage_round

    def held_round(items):
        rounds.append([len(body["samples"]) for _, _, body in items])
        if len(rounds) == 1:
            release.wait(WAIT_S)
        return original(items)

    monkeypatch.setattr(server, "_usage_round", held_round)
    return rounds, release


def test_usage_reports_that_arrive_during_a_round_are_stored_together_in_the_next(shed, renter, monkeypatch):
    unit, credential = shed
    an_hour_ago = timezone.now() - timedelta(hours=1)
    allocation = allocation_since(job_place(job_id=job_make(renter, gpu_count=2).pk), an_hour_ago)
    rounds, release = held_usage_rounds(monkeypatch)
    usage = protocol.allocation_path(str(allocation.pk), "usage")

    def report(seq):
        sample = {"seq": seq, "gpu_ms": 1_000, "recorded_at": timezone.now().isoformat()}
        return json.dumps({"id": seq, "method": "POST", "path": usage, "body": {"samples": [sample]}})

    async def scenario():
        agent = Agent(credential)
        await agent.connect()
        await agent.wire.send_input({"type": "websocket.receive", "text": report(1)})
        await eventually(lambda: rounds == [[1]], "the first round under way")
        for seq in range(2, 12):
            await agent.wire.send_input({"type": "websocket.receive", "text": report(seq)})
        await eventually(lambda: len(server.hub()._usage_waiting) == 10, "ten waiting")
        release.set()
        answers = {}
        while len(answers) < 11:
            frame = await agent.frame()
            if "re" in frame:
                answers[frame["re"]] = (frame["status"], frame["body"])
        assert answers == {seq: (200, {"accepted": 1, "duplicates": 0}) for seq in range(1, 12)}
        await agent.disconnect()

    run(scenario())

    assert rounds == [[1], [1] * 10]
    assert UsageSample.objects.filter(allocation=allocation).count() == 11


def test_a_connection_server_logs_what_it_served(shed, settings, caplog):
    settings.STREAM_STATS_S = 0.2
    caplog.set_level("INFO", logger="marketplace.jobs.agent_stream.server")

    def served() -> Counter:
        """The counts of every stats line so far, added up (the beats may fall in two lines)."""
        total = Counter()
        for record in caplog.records:
            message = record.getMessage()
            if message.startswith("stream_stats"):
                fields = dict(field.split("=") for field in message.split()[1:])
                assert {"streams", "loop_lag_max_ms"} <= set(fields)
                total.update({name: int(value) for name, value in fields.items() if name.startswith("beats_")})
        return total

    async def scenario():
        agent = Agent(shed[1])
        await agent.connect()
        await agent.beat()
        await agent.beat()
        await eventually(lambda: served()["beats_cheap"] == 1, "the cheap beat in a stats line")
        await agent.disconnect()

    run(scenario())

    assert served()["beats_full"] == 1


def test_a_usage_round_takes_reports_up_to_its_bound_of_samples(shed, renter, settings, monkeypatch):
    settings.STREAM_USAGE_ROUND_SAMPLES = 25
    unit, credential = shed
    an_hour_ago = timezone.now() - timedelta(hours=1)
    allocation = allocation_since(job_place(job_id=job_make(renter, gpu_count=2).pk), an_hour_ago)
    rounds, release = held_usage_rounds(monkeypatch)
    usage = protocol.allocation_path(str(allocation.pk), "usage")
    sizes = {1: 1, 2: 10, 3: 10, 4: 10, 5: 40, 6: 5}  # call id -> samples in its report
    first_seq = {call: sum(list(sizes.values())[: call - 1]) + 1 for call in sizes}

    def report(call):
        at = timezone.now().isoformat()
        samples = [{"seq": first_seq[call] + n, "gpu_ms": 10, "recorded_at": at} for n in range(sizes[call])]
        return json.dumps({"id": call, "method": "POST", "path": usage, "body": {"samples": samples}})

    async def scenario():
        agent = Agent(credential)
        await agent.connect()
        await agent.wire.send_input({"type": "websocket.receive", "text": report(1)})
        await eventually(lambda: len(rounds) == 1, "the first round under way")
        for call in range(2, 7):
            await agent.wire.send_input({"type": "websocket.receive", "text": report(call)})
        await eventually(lambda: len(server.hub()._usage_waiting) == 5, "five waiting")
        release.set()
        answers = {}
        while len(answers) < len(sizes):
            frame = await agent.frame()
            if "re" in frame:
                answers[frame["re"]] = (frame["status"], frame["body"])
        assert answers == {call: (200, {"accepted": n, "duplicates": 0}) for call, n in sizes.items()}
        await agent.disconnect()

    run(scenario())

    # 10 + 10 fit in 25 samples, the third 10 would not; 40 is over the bound, so it goes alone.
    assert rounds == [[1], [10, 10], [10], [40], [5]]
