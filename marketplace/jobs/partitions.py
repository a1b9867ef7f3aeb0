"""Usage samples partitioned by their allocation's start, a partition per week (PostgreSQL only).

Why the allocation's start and not when a sample came: PostgreSQL wants every unique constraint
of a partitioned table to hold the partition key, and (allocation, seq) must stay unique. The
allocation's start is a function of the allocation (a foreign key to (allocation, created_at)
makes it one), so unique (allocation, seq, allocation_started_at) is the same guarantee, and a
replayed sample always lands in the partition of its first copy. Allocations last at most
JOB_MAX_DURATION_S, so once a week's allocations have all ended and been rolled up
(marketplace/jobs/retention.py) its partition holds nothing anyone reads, and is dropped whole
instead of deleted row by row.

Why weeks: at 10,000 busy units a week is ~600 M rows, a month ~2.6 G. A partition goes only when
its last allocation is past the dispute window, so a month's would keep up to a month of rows
beyond that; a week's, a week. Queries that name no start (by allocation alone) probe each
partition's index: with a 35-day window and 30-day allocations that is about 14 partitions.

Partitions are made USAGE_PARTITIONS_AHEAD_WEEKS ahead of the current week. Beyond them a
DEFAULT partition takes any sample, so an insert never fails for want of a partition; making a
partition first moves the default's rows of its week into it (PostgreSQL refuses a partition
whose range the default already holds rows of).
"""

from datetime import UTC, datetime, timedelta

TABLE = "jobs_usagesample"
DEFAULT = f"{TABLE}_default"
WEEK = timedelta(days=7)
# The drop takes an ACCESS EXCLUSIVE lock on the parent for a moment: waiting longer than this
# behind a long reader would hold up every insert queued behind it, so it gives up and the next
# run tries again.
DROP_LOCK_TIMEOUT = "5s"


def week_start(at: datetime) -> datetime:
    """Monday 00:00 UTC of the week ``at`` falls in."""
    day = at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday())


def partition_name(start: datetime) -> str:
    return f"{TABLE}_p{start:%Y%m%d}"


def partition_start(name: str) -> datetime:
    return datetime.strptime(name.removeprefix(f"{TABLE}_p"), "%Y%m%d").replace(tzinfo=UTC)


def is_partitioned(cursor) -> bool:
    cursor.execute("SELECT EXISTS (SELECT 1 FROM pg_partitioned_table t JOIN pg_class c ON c.oid = t.partrelid "
                   "WHERE c.relname = %s)", [TABLE])  # fmt: skip
    return cursor.fetchone()[0]


def partitions(cursor) -> list[str]:
    """The week partitions' names, oldest first (the default partition left out)."""
    cursor.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = %s AND c.relname <> %s ORDER BY c.relname",
        [TABLE, DEFAULT],
    )
    return [name for (name,) in cursor.fetchall()]


def partition_create(cursor, start: datetime) -> bool:
    """Make the partition of the week starting at ``start`` unless it exists; True if made."""
    name, end = partition_name(start), start + WEEK
    cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [name])
    if cursor.fetchone()[0]:
        return False
    # Rows of the week already in the default partition go in the new one; in one transaction,
    # so an insert meanwhile waits for the lock rather than finding no partition.
    cursor.execute(
        f"CREATE TEMPORARY TABLE usage_moving ON COMMIT DROP AS WITH moved AS (DELETE FROM {DEFAULT} "  # noqa: S608
        "WHERE allocation_started_at >= %s AND allocation_started_at < %s RETURNING *) SELECT * FROM moved",
        [start, end],
    )
    cursor.execute(f"CREATE TABLE {name} PARTITION OF {TABLE} FOR VALUES FROM (%s) TO (%s)", [start, end])
    cursor.execute(f"INSERT INTO {TABLE} SELECT * FROM usage_moving")  # noqa: S608 - names are ours
    cursor.execute("DROP TABLE usage_moving")
    return True


def partition_drop(cursor, name: str) -> None:
    """Detach the partition and drop it; call it in a transaction."""
    cursor.execute(f"SET LOCAL lock_timeout = '{DROP_LOCK_TIMEOUT}'")
    cursor.execute(f"ALTER TABLE {TABLE} DETACH PARTITION {name}")
    cursor.execute(f"DROP TABLE {name}")


# The partitioned table: the model's columns, with the constraints PostgreSQL allows a
# partitioned table (each unique one holds the key). The id keeps a sequence of its own
# (identity columns come to partitioned tables only in PostgreSQL 17). The single-column foreign
# key to the allocation is replaced by the one to (allocation, created_at), which implies it.
CREATE_PARTITIONED = f"""
CREATE TABLE {TABLE}_partitioned (
    id bigint NOT NULL,
    seq integer NOT NULL CONSTRAINT jobs_usagesample_seq_check CHECK (seq >= 0),
    gpu_ms bigint NOT NULL,
    recorded_at timestamp with time zone NOT NULL,
    received_at timestamp with time zone NOT NULL,
    allocation_id uuid NOT NULL,
    allocation_started_at timestamp with time zone NOT NULL
) PARTITION BY RANGE (allocation_started_at)
"""
CONSTRAIN = [
    f"ALTER TABLE {TABLE} ADD CONSTRAINT {TABLE}_pkey PRIMARY KEY (id, allocation_started_at)",
    f"ALTER TABLE {TABLE} ADD CONSTRAINT usage_sample_unique_seq UNIQUE (allocation_id, seq, allocation_started_at)",
    f"ALTER TABLE {TABLE} ADD CONSTRAINT usage_sample_not_negative CHECK (gpu_ms >= 0)",
    f"ALTER TABLE {TABLE} ADD CONSTRAINT usage_sample_allocation_started FOREIGN KEY (allocation_id, "
    "allocation_started_at) REFERENCES jobs_allocation (id, created_at) DEFERRABLE INITIALLY DEFERRED",
    f"CREATE INDEX jobs_usages_receive_a836ef_idx ON {TABLE} (received_at)",
    f"CREATE SEQUENCE {TABLE}_id_seq OWNED BY {TABLE}.id",
    f"SELECT setval('{TABLE}_id_seq', COALESCE((SELECT MAX(id) FROM {TABLE}), 0) + 1, false)",  # noqa: S608
    f"ALTER TABLE {TABLE} ALTER COLUMN id SET DEFAULT nextval('{TABLE}_id_seq')",
]


def table_partition(cursor, *, now: datetime, ahead_weeks: int) -> None:
    """Turn the plain table into the partitioned one, its rows copied: partitions from the week
    of the oldest allocation that has samples to ``ahead_weeks`` after ``now``'s, and the default."""
    cursor.execute(CREATE_PARTITIONED)
    cursor.execute(f"CREATE TABLE {DEFAULT} PARTITION OF {TABLE}_partitioned DEFAULT")
    cursor.execute(f"SELECT MIN(allocation_started_at) FROM {TABLE}")  # noqa: S608
    oldest = cursor.fetchone()[0] or now
    start = week_start(oldest)
    while start <= week_start(now) + ahead_weeks * WEEK:
        cursor.execute(
            f"CREATE TABLE {partition_name(start)} PARTITION OF {TABLE}_partitioned FOR VALUES FROM (%s) TO (%s)",
            [start, start + WEEK],
        )
        start += WEEK
    cursor.execute(
        f"INSERT INTO {TABLE}_partitioned (id, seq, gpu_ms, recorded_at, received_at, allocation_id, "  # noqa: S608
        f"allocation_started_at) SELECT id, seq, gpu_ms, recorded_at, received_at, allocation_id, "
        f"allocation_started_at FROM {TABLE}"
    )
    cursor.execute(f"DROP TABLE {TABLE}")
    cursor.execute(f"ALTER TABLE {TABLE}_partitioned RENAME TO {TABLE}")
    for statement in CONSTRAIN:
        cursor.execute(statement)
