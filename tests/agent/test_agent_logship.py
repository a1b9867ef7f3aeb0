import pytest

from nodes.agent.logship import CAP_BYTES, CHUNK_BYTES, Chunk, new_chunks
from nodes.agent.runtime.environment import masks


def test_new_bytes_come_as_one_chunk_from_the_offset_on(tmp_path):
    log = tmp_path / "job.log"
    log.write_bytes(b"hello\nworld\n")

    assert new_chunks(log, 6) == [Chunk(6, 12, "world\n")]
    assert new_chunks(log, 12) == []


def test_a_character_cut_short_waits_for_its_last_bytes_until_the_end(tmp_path):
    log = tmp_path / "job.log"
    log.write_bytes("né".encode()[:-1])

    assert new_chunks(log, 0) == [Chunk(0, 1, "n")]
    assert new_chunks(log, 1) == []
    assert new_chunks(log, 1, final=True) == [Chunk(1, 2, "\ufffd")]


def test_long_output_is_cut_into_chunks_of_whole_characters(tmp_path):
    log = tmp_path / "job.log"
    log.write_bytes(b"a" + "é".encode() * CHUNK_BYTES)

    chunks = new_chunks(log, 0, final=True)

    assert [chunk.end - chunk.offset for chunk in chunks] == [CHUNK_BYTES - 1, CHUNK_BYTES, 2]
    assert "".join(chunk.data for chunk in chunks) == "a" + "é" * CHUNK_BYTES
    assert all(chunk.end == following.offset for chunk, following in zip(chunks, chunks[1:], strict=False))


def test_shipping_stops_at_the_cap(tmp_path):
    log = tmp_path / "job.log"
    log.write_bytes(b"x" * (CAP_BYTES + 10))

    chunks = new_chunks(log, 0)

    assert chunks[-1].end == CAP_BYTES
    assert new_chunks(log, CAP_BYTES) == []


def test_bytes_the_server_cannot_store_are_replaced(tmp_path):
    log = tmp_path / "job.log"
    log.write_bytes(b"nul\x00 bad\xff end")

    assert new_chunks(log, 0) == [Chunk(0, 13, "nul\ufffd bad\ufffd end")]


def test_a_missing_log_ships_nothing(tmp_path):
    assert new_chunks(tmp_path / "none.log", 0, final=True) == []


SECRET = "s3cr3t-value"
MASKS = masks({"API_KEY": SECRET})


def test_a_secret_in_the_log_is_masked_byte_for_byte(tmp_path):
    log = tmp_path / "job.log"
    log.write_bytes(f"key={SECRET}, again {SECRET}{SECRET}\n".encode())

    [chunk] = new_chunks(log, 0, masks=MASKS)

    stars = "*" * len(SECRET)
    assert chunk == Chunk(0, log.stat().st_size, f"key={stars}, again {stars}{stars}\n")


def test_a_secret_across_a_chunk_boundary_is_masked_in_both_chunks(tmp_path):
    log = tmp_path / "job.log"
    log.write_bytes(b"x" * (CHUNK_BYTES - 5) + SECRET.encode() + b"\n")

    chunks = new_chunks(log, 0, final=True, masks=MASKS)

    assert [(chunk.offset, chunk.end) for chunk in chunks] == [(0, CHUNK_BYTES), (CHUNK_BYTES, log.stat().st_size)]
    assert "".join(chunk.data for chunk in chunks) == "x" * (CHUNK_BYTES - 5) + "*" * len(SECRET) + "\n"


def test_the_start_of_a_secret_at_the_end_of_a_growing_log_waits_for_the_rest(tmp_path):
    log = tmp_path / "job.log"
    log.write_bytes(f"key={SECRET[:7]}".encode())

    assert new_chunks(log, 0, masks=MASKS) == [Chunk(0, 4, "key=")]
    assert new_chunks(log, 4, masks=MASKS) == []

    with open(log, "ab") as more:
        more.write(f"{SECRET[7:]}\n".encode())

    assert new_chunks(log, 4, masks=MASKS) == [Chunk(4, 17, "*" * len(SECRET) + "\n")]


def test_text_that_only_looked_like_the_start_of_a_secret_goes_out_once_it_differs(tmp_path):
    log = tmp_path / "job.log"
    log.write_bytes(b"s3cr")
    assert new_chunks(log, 0, masks=MASKS) == []

    log.write_bytes(b"s3cret sauce")

    assert new_chunks(log, 0, masks=MASKS) == [Chunk(0, 12, "s3cret sauce")]


def test_a_job_that_ended_part_way_through_a_secret_has_that_part_masked(tmp_path):
    log = tmp_path / "job.log"
    log.write_bytes(f"key={SECRET[:7]}".encode())

    assert new_chunks(log, 4, final=True, masks=MASKS) == [Chunk(4, 11, "*******")]


def test_a_secret_whose_end_is_also_its_start_is_never_shown_in_part(tmp_path):
    """Held back from its second "ab" (which may begin another one), the value is read again
    whole next time, so its end is masked again rather than sent as it is."""
    log = tmp_path / "job.log"
    log.write_bytes(b"<abab")
    values = masks({"PAIR": "abab"})

    first = new_chunks(log, 0, masks=values)
    log.write_bytes(b"<abab>")
    second = new_chunks(log, first[-1].end, masks=values)

    assert first == [Chunk(0, 1, "<")]
    assert second == [Chunk(1, 6, "****>")]


def test_a_secret_in_utf8_is_masked_by_its_bytes(tmp_path):
    log = tmp_path / "job.log"
    value = "pässwörd-🔑"
    log.write_bytes(f"» {value} «".encode())

    [chunk] = new_chunks(log, 0, final=True, masks=masks({"PASSWORD": value}))

    assert chunk == Chunk(0, log.stat().st_size, "» " + "*" * len(value.encode()) + " «")


@pytest.mark.parametrize("final", [False, True])
def test_a_secret_across_the_cap_is_masked_up_to_it(tmp_path, final):
    log = tmp_path / "job.log"
    log.write_bytes(b"x" * (CAP_BYTES - 2) + SECRET.encode() + b" and more")

    chunks = new_chunks(log, CAP_BYTES - 10, final=final, masks=MASKS)

    assert chunks == [Chunk(CAP_BYTES - 10, CAP_BYTES, "xxxxxxxx**")]


def test_values_shorter_than_four_bytes_are_not_masked(tmp_path):
    log = tmp_path / "job.log"
    log.write_bytes(b"pin 123, pass abcd\n")

    [chunk] = new_chunks(log, 0, masks=masks({"PIN": "123", "PASS": "abcd"}))

    assert chunk.data == "pin 123, pass ****\n"
