"""The local ledger: every record is committed to SQLite before anything is published.

One file in WAL mode with ``synchronous=FULL``: a record that ``append`` returned is on disk
and survives a killed process or a power cut. The table doubles as the outbox: rows with no
``sent_at`` are still to be published, and the publisher marks rows sent only when the broker
has acknowledged them. The per-machine hash chain is extended inside the same transaction
that stores the record, so two records can never claim the same predecessor.

SQLite calls block, so :class:`Ledger` runs them on one dedicated thread; the event loop only
awaits them. The file is created readable and writable by its owner only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from energy_agent.core.errors import DuplicateRecord, RecordError
from energy_agent.core.record import GENESIS, Record, parse_record

_T = TypeVar("_T")

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS records (
    id          INTEGER PRIMARY KEY,
    record_id   TEXT NOT NULL UNIQUE,
    machine     TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    start       TEXT NOT NULL,
    end         TEXT NOT NULL,
    hash        TEXT NOT NULL,
    prev_hash   TEXT NOT NULL,
    body        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    sent_at     REAL,
    UNIQUE (machine, seq)
);
CREATE INDEX IF NOT EXISTS records_outbox ON records (id) WHERE sent_at IS NULL;
CREATE INDEX IF NOT EXISTS records_start ON records (start);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS confirmations (
    record_id   TEXT NOT NULL,
    by          TEXT NOT NULL,
    at          REAL NOT NULL,
    PRIMARY KEY (record_id, by)
);
CREATE TABLE IF NOT EXISTS anchors (
    machine     TEXT PRIMARY KEY,
    seq         INTEGER NOT NULL,
    hash        TEXT NOT NULL,
    record_id   TEXT NOT NULL,
    pruned_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    machine     TEXT PRIMARY KEY,
    body        TEXT NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoint_samples (
    machine     TEXT NOT NULL,
    t           REAL NOT NULL,
    e           REAL,
    p           REAL,
    PRIMARY KEY (machine, t)
) WITHOUT ROWID;
"""
MIGRATIONS = (
    # (table, column, definition): columns added after the first release, added in place.
    ("records", "confirmed_at", "REAL"),
)
LEDGER_VERSION = "1"


def _real(x: float) -> float | None:
    return None if x != x else float(x)  # SQLite stores NaN as NULL anyway; say so


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[sqlite3.Connection]:
    """One transaction: committed when the block ends, rolled back when it raises."""
    db.execute(begin)
    try:
        yield db
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._db: sqlite3.Connection | None = None

    # ------------------------------------------------------------------ thread side

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.DatabaseError as exc:
            raise RecordError(f"{self.path}: cannot open the ledger: {exc}") from exc
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(SCHEMA_SQL)
            for table, column, definition in MIGRATIONS:
                have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            db.execute("CREATE INDEX IF NOT EXISTS records_unconfirmed ON records (id) WHERE confirmed_at IS NULL")
            row = db.execute("SELECT value FROM meta WHERE key='ledger_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('ledger_version', ?)", (LEDGER_VERSION,))
            elif row[0] != LEDGER_VERSION:
                raise RecordError(f"{self.path}: ledger version {row[0]} is not {LEDGER_VERSION}")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise RecordError(f"{self.path}: cannot open the ledger: {exc}") from exc
        self._db = db

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._open()
        assert self._db is not None
        return self._db

    def _append(self, machine: str, build: Callable[[int, str], Record]) -> Record:
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT seq, hash FROM records WHERE machine=? ORDER BY seq DESC LIMIT 1", (machine,)
            ).fetchone()
            seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
            rec = build(seq, prev)
            db.execute(
                "INSERT INTO records (record_id, machine, seq, start, end, hash, prev_hash, body, created_at)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (rec.record_id, machine, seq, rec.start, rec.end, rec.hash, prev, rec.canonical().decode(),
                 time.time()),
            )
            db.execute("COMMIT")
        except sqlite3.IntegrityError as exc:
            db.execute("ROLLBACK")
            raise DuplicateRecord(f"{machine}: record {rec.record_id} already in the ledger ({exc})") from exc
        except sqlite3.DatabaseError as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise RecordError(f"{self.path}: cannot store the record of {machine}: {exc}") from exc
        return rec

    def _outbox(self, limit: int) -> list[tuple[int, Record]]:
        rows = self._conn().execute(
            "SELECT id, body FROM records WHERE sent_at IS NULL ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [(i, self._parse(i, b)) for i, b in rows]

    def _mark_sent(self, ids: list[int]) -> None:
        now = time.time()
        with _transaction(self._conn()) as db:
            db.executemany("UPDATE records SET sent_at=? WHERE id=?", [(now, i) for i in ids])

    def _outbox_due(self, limit: int, resend_before: float | None) -> list[tuple[int, str, str]]:
        if resend_before is None:
            rows = self._conn().execute(
                "SELECT id, machine, body FROM records WHERE sent_at IS NULL ORDER BY id LIMIT ?", (limit,))
        else:
            rows = self._conn().execute(
                "SELECT id, machine, body FROM records WHERE sent_at IS NULL"
                " UNION SELECT id, machine, body FROM records WHERE confirmed_at IS NULL AND sent_at < ?"
                " ORDER BY id LIMIT ?", (resend_before, limit))
        return rows.fetchall()

    def _confirm(self, record_ids: list[str], by: str, required: frozenset[str]) -> int:
        """Store ``by``'s confirmations; records confirmed by every required party get
        ``confirmed_at``. Returns how many records became fully confirmed."""
        now = time.time()
        done = 0
        with _transaction(self._conn(), "BEGIN IMMEDIATE") as db:
            db.executemany("INSERT OR IGNORE INTO confirmations (record_id, by, at) VALUES (?,?,?)",
                           [(rid, by, now) for rid in record_ids])
            if by in required:
                for rid in record_ids:
                    have = {b for (b,) in db.execute("SELECT by FROM confirmations WHERE record_id=?", (rid,))}
                    if required <= have:
                        done += db.execute("UPDATE records SET confirmed_at=? WHERE record_id=? AND confirmed_at IS NULL",
                                           (now, rid)).rowcount
        return done

    def _resend_unconfirmed(self) -> int:
        with _transaction(self._conn()) as db:
            return db.execute("UPDATE records SET sent_at=NULL WHERE confirmed_at IS NULL AND sent_at IS NOT NULL"
                              ).rowcount

    def _prune(self, before: float, need_confirmed: bool) -> dict[str, int]:
        """Delete delivered records created before ``before``, oldest first per machine, never a
        machine's newest record; the last deleted one becomes the machine's anchor, so the rest of
        the chain still verifies (its first prev_hash equals the anchor's hash)."""
        done_col = "confirmed_at" if need_confirmed else "sent_at"
        pruned: dict[str, int] = {}
        with _transaction(self._conn(), "BEGIN IMMEDIATE") as db:
            machines = [m for (m,) in db.execute("SELECT DISTINCT machine FROM records")]
            for machine in machines:
                head = db.execute("SELECT max(seq) FROM records WHERE machine=?", (machine,)).fetchone()[0]
                # The first record that must stay: undelivered, too young, or the head.
                stop = db.execute(
                    f"SELECT min(seq) FROM records WHERE machine=? AND ({done_col} IS NULL OR created_at >= ?"
                    " OR seq = ?)", (machine, before, head)).fetchone()[0]
                last = db.execute("SELECT seq, hash, record_id FROM records WHERE machine=? AND seq < ?"
                                  " ORDER BY seq DESC LIMIT 1", (machine, stop)).fetchone()
                if last is None:
                    continue
                ids = [r for (r,) in db.execute("SELECT record_id FROM records WHERE machine=? AND seq <= ?",
                                                (machine, last[0]))]
                db.executemany("DELETE FROM confirmations WHERE record_id=?", [(r,) for r in ids])
                db.execute("DELETE FROM records WHERE machine=? AND seq <= ?", (machine, last[0]))
                db.execute("INSERT OR REPLACE INTO anchors (machine, seq, hash, record_id, pruned_at)"
                           " VALUES (?,?,?,?,?)", (machine, last[0], last[1], last[2], time.time()))
                pruned[machine] = len(ids)
        return pruned

    def _save_checkpoints(self, items: list[tuple[str, str | None, Any, float]]) -> None:
        """One transaction: per machine, its tracker state (None: nothing open, forget it), the
        samples (rows of t, e, p) taken since the last checkpoint, and the time before which
        stored samples are no longer needed."""
        now = time.time()
        with _transaction(self._conn()) as db:
            for machine, body, rows, keep_from in items:
                if body is None:
                    db.execute("DELETE FROM checkpoints WHERE machine=?", (machine,))
                    db.execute("DELETE FROM checkpoint_samples WHERE machine=?", (machine,))
                    continue
                db.execute("INSERT OR REPLACE INTO checkpoints (machine, body, updated_at) VALUES (?,?,?)",
                           (machine, body, now))
                db.execute("DELETE FROM checkpoint_samples WHERE machine=? AND t < ?", (machine, keep_from))
                if len(rows):
                    db.executemany("INSERT OR REPLACE INTO checkpoint_samples (machine, t, e, p) VALUES (?,?,?,?)",
                                   [(machine, float(t), _real(e), _real(p)) for t, e, p in rows])

    def _load_checkpoints(self) -> dict[str, tuple[dict[str, Any], list[tuple[float, float, float]]]]:
        db = self._conn()
        out: dict[str, tuple[dict[str, Any], list[tuple[float, float, float]]]] = {}
        for machine, body in db.execute("SELECT machine, body FROM checkpoints"):
            rows = db.execute("SELECT t, e, p FROM checkpoint_samples WHERE machine=? ORDER BY t", (machine,))
            out[machine] = (json.loads(body), [(t, _nan(e), _nan(p)) for t, e, p in rows])
        return out

    def _anchors(self) -> dict[str, tuple[int, str]]:
        return {m: (s, h) for m, s, h in self._conn().execute("SELECT machine, seq, hash FROM anchors")}

    def _query(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        return self._conn().execute(sql, args).fetchall()

    # ------------------------------------------------------------------ loop side

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def open(self) -> None:
        await self._run(self._conn)

    async def append(self, machine: str, build: Callable[[int, str], Record]) -> Record:
        """Build the machine's next record with (seq, prev_hash) and commit it; returns it."""
        return await self._run(self._append, machine, build)

    async def outbox(self, limit: int = 500) -> list[tuple[int, Record]]:
        """Unsent records, oldest first, as (row id, record)."""
        return await self._run(self._outbox, limit)

    async def outbox_due(self, limit: int, resend_before: float | None) -> list[tuple[int, str, str]]:
        """Unsent records, and (when ``resend_before`` is given) records sent before that time
        and still not confirmed by the bridges, oldest first, as (row id, machine, canonical
        JSON exactly as stored: what is published, byte for byte)."""
        return await self._run(self._outbox_due, limit, resend_before)

    async def confirm(self, record_ids: list[str], by: str, required: frozenset[str]) -> int:
        return await self._run(self._confirm, record_ids, by, required)

    async def resend_unconfirmed(self) -> int:
        """Mark every sent but unconfirmed record unsent again (the broker lost its state)."""
        return await self._run(self._resend_unconfirmed)

    async def prune(self, before: float, need_confirmed: bool) -> dict[str, int]:
        return await self._run(self._prune, before, need_confirmed)

    async def save_checkpoints(self, items: list[tuple[str, str | None, Any, float]]) -> None:
        if items:
            await self._run(self._save_checkpoints, items)

    async def load_checkpoints(self) -> dict[str, tuple[dict[str, Any], list[tuple[float, float, float]]]]:
        return await self._run(self._load_checkpoints)

    async def mark_sent(self, ids: list[int]) -> None:
        if ids:
            await self._run(self._mark_sent, ids)

    async def pending(self) -> int:
        rows = await self._run(self._query, "SELECT count(*) FROM records WHERE sent_at IS NULL", ())
        return int(rows[0][0])

    def _release(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def release(self) -> None:
        """Close the file now; the next call opens it again (e.g. after its file system was
        remounted, or to let an operator move it)."""
        await self._run(self._release)

    async def close(self) -> None:
        await self._run(self._release)
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ offline reading (CLI)

    def records(self, machine: str | None = None, since: str | None = None, limit: int | None = None) -> list[Record]:
        """Records in ledger order (synchronous: for the CLI and verifiers, not the agent loop)."""
        sql = "SELECT id, body FROM records WHERE 1=1"
        args: list[str | int] = []
        if machine:
            sql += " AND machine=?"
            args.append(machine)
        if since:
            sql += " AND start>=?"
            args.append(since)
        sql += " ORDER BY id"
        if limit:
            sql += " LIMIT ?"
            args.append(limit)
        return [self._parse(row_id, body) for row_id, body in self._query(sql, tuple(args))]

    def _parse(self, row_id: int, body: str) -> Record:
        try:
            return parse_record(body)
        except RecordError as exc:
            raise RecordError(f"{self.path}: row {row_id} is not a valid record: {exc}") from exc

    def anchors(self) -> dict[str, tuple[int, str]]:
        """Per machine, (seq, hash) of the last pruned record: where its chain now begins."""
        return self._anchors()

    def close_sync(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._pool.shutdown(wait=False)
