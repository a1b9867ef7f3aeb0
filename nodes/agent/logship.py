"""New bytes of a job's log, cut into the chunks the server takes.

Offsets count bytes of the log file, so a chunk sent again after a restart has the same offset
and the same text. Chunks hold whole UTF-8 characters and at most 64 KiB, and shipping stops at
1 MiB per job, as much as the server keeps.
"""

from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 64 * 1024
CAP_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Chunk:
    offset: int
    end: int
    data: str


def new_chunks(path: Path, offset: int, *, final: bool = False) -> list[Chunk]:
    """Chunks from byte `offset` on. Until `final`, a character cut short at the end of the file
    waits for its last bytes."""
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            raw = log.read(max(0, CAP_BYTES - offset))
    except OSError:
        return []
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
