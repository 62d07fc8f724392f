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
import json
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent.errors import DuplicateRecord, RecordError
from agent.record import GENESIS, canonical_json

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
"""
LEDGER_VERSION = "1"


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
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(SCHEMA_SQL)
            row = db.execute("SELECT value FROM meta WHERE key='ledger_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('ledger_version', ?)", (LEDGER_VERSION,))
            elif row[0] != LEDGER_VERSION:
                raise RecordError(f"{self.path}: ledger version {row[0]} is not {LEDGER_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise RecordError(f"{self.path}: cannot open the ledger: {exc}") from exc
        self._db = db

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._open()
        assert self._db is not None
        return self._db

    def _append(self, machine: str, build: Callable[[int, str], dict]) -> dict:
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
                (rec["record_id"], machine, seq, rec["start"], rec["end"], rec["hash"], prev,
                 canonical_json(rec).decode(), time.time()),
            )
            db.execute("COMMIT")
        except sqlite3.IntegrityError as exc:
            db.execute("ROLLBACK")
            raise DuplicateRecord(f"{machine}: record {rec.get('record_id')} already in the ledger ({exc})") from exc
        except sqlite3.DatabaseError as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise RecordError(f"{self.path}: cannot store the record of {machine}: {exc}") from exc
        return rec

    def _outbox(self, limit: int) -> list[tuple[int, dict]]:
        rows = self._conn().execute(
            "SELECT id, body FROM records WHERE sent_at IS NULL ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [(i, json.loads(b)) for i, b in rows]

    def _mark_sent(self, ids: list[int]) -> None:
        db = self._conn()
        now = time.time()
        db.execute("BEGIN")
        db.executemany("UPDATE records SET sent_at=? WHERE id=?", [(now, i) for i in ids])
        db.execute("COMMIT")

    def _query(self, sql: str, args: tuple) -> list[Any]:
        return self._conn().execute(sql, args).fetchall()

    # ------------------------------------------------------------------ loop side

    async def _run(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def open(self) -> None:
        await self._run(self._conn)

    async def append(self, machine: str, build: Callable[[int, str], dict]) -> dict:
        """Build the machine's next record with (seq, prev_hash) and commit it; returns it."""
        return await self._run(self._append, machine, build)

    async def outbox(self, limit: int = 500) -> list[tuple[int, dict]]:
        """Unsent records, oldest first, as (row id, record)."""
        return await self._run(self._outbox, limit)

    async def mark_sent(self, ids: list[int]) -> None:
        if ids:
            await self._run(self._mark_sent, ids)

    async def pending(self) -> int:
        rows = await self._run(self._query, "SELECT count(*) FROM records WHERE sent_at IS NULL", ())
        return int(rows[0][0])

    async def close(self) -> None:
        def _close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
        await self._run(_close)
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ offline reading (CLI)

    def records(self, machine: str | None = None, since: str | None = None, limit: int | None = None) -> list[dict]:
        """Records in ledger order (synchronous: for the CLI and verifiers, not the agent loop)."""
        sql, args = "SELECT body FROM records WHERE 1=1", []
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
        return [json.loads(b) for (b,) in self._query(sql, tuple(args))]

    def close_sync(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._pool.shutdown(wait=False)
