from nodes.agent.logship import CAP_BYTES, CHUNK_BYTES, Chunk, new_chunks


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
