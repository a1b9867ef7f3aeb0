import stat

import httpx

from nodes.agent.client import AgentClient
from nodes.agent.outbox import Outbox, Report
from nodes.agent.reports import Reporter
from tests.agent.fakes import CREDENTIAL, FakeServer

A, B = "5f0c9a4e-1b2d-4c3e-8f6a-7b8c9d0e1f2a", "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6"


def usage(seq: int, gpu_ms: int = 1000, at: str = "2025-01-01T00:00:00.000Z", allocation: str = A) -> Report:
    return Report("usage", allocation, {"seq": seq, "gpu_ms": gpu_ms, "recorded_at": at})


def finish(allocation: str = A) -> Report:
    return Report("finish", allocation, {"exit_code": 0, "reason": "exited"})


def test_reports_outlive_the_outbox_that_took_them(tmp_path):
    first = Outbox(tmp_path / "outbox")
    for report in (usage(1), usage(2), Report("logs", A, {"offset": 0, "end": 3, "data": "hi\n"}), finish()):
        first.add(report)
    first.drop(1)

    again = Outbox(tmp_path / "outbox")

    assert list(again) == [usage(2), Report("logs", A, {"offset": 0, "end": 3, "data": "hi\n"}), finish()]
    again.add(usage(1, allocation=B))
    assert list(Outbox(tmp_path / "outbox"))[-1] == usage(1, allocation=B)


def test_the_outbox_is_private_to_the_owner(tmp_path):
    outbox = Outbox(tmp_path / "outbox")
    outbox.add(usage(1))

    assert stat.S_IMODE((tmp_path / "outbox").stat().st_mode) == 0o700
    assert [stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "outbox").iterdir()] == [0o600]


def test_a_half_written_file_is_ignored_and_an_unreadable_one_set_aside(tmp_path):
    folder = tmp_path / "outbox"
    Outbox(folder).add(usage(1))
    (folder / ".000000000002.json.tmp").write_text('{"kind": "us')
    (folder / "000000000003.json").write_text("not json")

    outbox = Outbox(folder)

    assert list(outbox) == [usage(1)]
    assert not (folder / ".000000000002.json.tmp").exists()
    assert (folder / "000000000003.bad").exists()
    outbox.add(usage(2))
    assert (folder / "000000000004.json").exists()


def test_past_its_bound_new_samples_merge_into_the_newest_unsent_one(tmp_path):
    outbox = Outbox(tmp_path / "outbox", max_reports=3)
    outbox.add(usage(1, allocation=B))
    outbox.add(usage(1, 500, "2025-01-01T00:00:01.000Z"))
    outbox.add(usage(2, 700, "2025-01-01T00:00:02.000Z"))

    outbox.add(usage(3, 300, "2025-01-01T00:00:03.000Z"))
    outbox.add(usage(2, 10, "2025-01-01T00:00:04.000Z", allocation=B))

    merged_a = usage(2, 1000, "2025-01-01T00:00:03.000Z")
    merged_b = usage(1, 1010, "2025-01-01T00:00:04.000Z", allocation=B)
    assert list(outbox) == [merged_b, usage(1, 500, "2025-01-01T00:00:01.000Z"), merged_a]
    assert list(Outbox(tmp_path / "outbox", max_reports=3)) == list(outbox)


def test_a_sample_that_may_have_reached_the_server_is_never_merged_into(tmp_path):
    outbox = Outbox(tmp_path / "outbox", max_reports=1)
    outbox.add(usage(1))
    outbox.batch()  # handed to the client: the server may have it even if the answer is lost

    outbox.add(usage(2))
    outbox.add(usage(3))

    assert [r.body["seq"] for r in outbox] == [1, 2]
    assert [r.body["gpu_ms"] for r in outbox] == [1000, 2000]


def test_after_a_restart_no_reloaded_sample_is_merged_into(tmp_path):
    Outbox(tmp_path / "outbox", max_reports=1).add(usage(1))
    outbox = Outbox(tmp_path / "outbox", max_reports=1)

    outbox.add(usage(2))

    assert [r.body["seq"] for r in outbox] == [1, 2]


def test_finish_reports_are_kept_past_the_bound(tmp_path):
    outbox = Outbox(tmp_path / "outbox", max_reports=1)
    outbox.add(usage(1))

    outbox.add(finish())

    assert list(outbox) == [usage(1), finish()]


def test_a_delivery_whose_answer_was_lost_is_sent_again_after_a_restart_and_counted_once(tmp_path):
    server = FakeServer()
    answers_lost = {"left": 1}

    def handle(request: httpx.Request) -> httpx.Response:
        response = server.handle(request)
        if answers_lost["left"] and request.url.path.endswith("/usage"):
            answers_lost["left"] -= 1
            raise httpx.ReadTimeout("the answer never came", request=request)
        return response

    def reporter() -> Reporter:
        client = AgentClient("http://shed.test", CREDENTIAL, transport=httpx.MockTransport(handle))
        return Reporter(client, Outbox(tmp_path / "outbox"), clock=lambda: 0.0)

    crashed = reporter()
    for seq in (1, 2):
        crashed.usage(A, usage(seq).body)
    crashed.flush()
    assert len(crashed.outbox) == 2 and sorted(server.samples[A]) == [1, 2]

    restarted = reporter()
    restarted.finish(A, 0, "exited")
    restarted.flush()

    assert not restarted.outbox
    assert not list((tmp_path / "outbox").iterdir())
    assert sum(s["gpu_ms"] for s in server.samples[A].values()) == 2000
    assert server.finished[A] == {"exit_code": 0, "reason": "exited"}
