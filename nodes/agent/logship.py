"""New bytes of a job's log, cut into the chunks the server takes, with the job's secrets masked.

Offsets count bytes of the log file, so a chunk sent again after a restart has the same offset
and the same text. Chunks hold whole UTF-8 characters and at most 64 KiB, and shipping stops at
1 MiB per job, as much as the server keeps.

Every byte of a secret value is replaced by "*", so offsets stay those of the file. A value can
be recognised only once it is whole, so what may be the start of one waits at the end of the file,
as a cut character does, until the rest is written; when the job has ended there, what it wrote
of the value is masked if it is MIN_MASK_BYTES long (a value's first letter alone is not worth
garbling an ordinary last line for). Values shorter than that are not masked at all.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nodes.agent.runtime.environment import MIN_MASK_BYTES

CHUNK_BYTES = 64 * 1024
CAP_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Chunk:
    offset: int
    end: int
    data: str


def new_chunks(path: Path, offset: int, *, final: bool = False, masks: Sequence[bytes] = ()) -> list[Chunk]:
    """Chunks from byte `offset` on, with every value in `masks` masked (`environment.masks`).
    Until `final`, a character cut short at the end of the file waits for its last bytes, and so
    does an end of the file that may be the start of a masked value."""
    room = max(0, CAP_BYTES - offset)
    # Read past the cap as far as a value that starts before it may reach, to mask all of it.
    beyond = max((len(mask) for mask in masks), default=1) - 1
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            raw = log.read(room + beyond)
    except OSError:
        return []
    spans = _spans(raw, masks)
    pending = unfinished(raw, masks)
    if final and pending >= MIN_MASK_BYTES:
        spans.append((len(raw) - pending, len(raw)))  # the job ended part way through a value
    raw = _masked(raw, spans)[: room if final else _ship_until(len(raw) - pending, spans, room)]
    chunks = []
    while raw:
        piece = raw[:CHUNK_BYTES]
        if len(raw) > CHUNK_BYTES or not final:
            piece = piece[: whole_characters(piece)]
        if not piece:
            break
        chunks.append(Chunk(offset, offset + len(piece), as_text(piece)))
        offset += len(piece)
        raw = raw[len(piece) :]
    return chunks


def unfinished(data: bytes, masks: Sequence[bytes]) -> int:
    """The length of the longest end of `data` that is the start, but not the whole, of a value
    in `masks`: a value the job may be writing still."""
    longest = 0
    for mask in masks:
        for size in range(min(len(mask) - 1, len(data)), longest, -1):
            if data.endswith(mask[:size]):
                longest = size
                break
    return longest


def _spans(data: bytes, masks: Sequence[bytes]) -> list[tuple[int, int]]:
    """Where each value in `masks` occurs in `data`, overlaps included."""
    spans = []
    for mask in masks:
        at = data.find(mask)
        while at != -1:
            spans.append((at, at + len(mask)))
            at = data.find(mask, at + 1)
    return spans


def _masked(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    masked = bytearray(data)
    for start, end in spans:
        masked[start:end] = b"*" * (end - start)
    return bytes(masked)


def _ship_until(end: int, spans: list[tuple[int, int]], room: int) -> int:
    """Where to stop, at `end` or short of it, so that no masked value is cut: the next read
    starts there and must see each value whole to mask it again (of "abab" held back from its
    second "ab" on, which may start another one, that "ab" would go out as it is)."""
    for start, stop in sorted(spans, reverse=True):
        if start < end < stop:
            end = start
    return min(end, room)


def whole_characters(piece: bytes) -> int:
    """The length of `piece` without a multi-byte character cut short at its end."""
    for back in range(1, min(4, len(piece)) + 1):
        byte = piece[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: the last character starts here
            needed = 1 if byte < 0xC0 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(piece) - back if needed > back else len(piece)
    return len(piece)


def as_text(piece: bytes) -> str:
    # PostgreSQL text cannot hold NUL, and the server refuses what is not valid UTF-8.
    return piece.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
