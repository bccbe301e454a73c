"""The durable job ledger (SQLite): one row per job with its input, state, output files, error and timings,
and one row per webhook message received (so a message is applied once, however often it arrives).

Several processes share it (the receiver writes what webhooks say, the runner what it submitted): WAL mode,
each change one IMMEDIATE transaction, synchronous=FULL so a committed change survives a crash.

States: pending (added, not yet accepted by the server) -> submitted -> starting -> processing -> succeeded,
failed or canceled (terminal); submit_failed when the server refused it. A state only moves forward: a late
or out-of-order event never overwrites a later one, and nothing overwrites a terminal state but a resubmit.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

TERMINAL = ("succeeded", "failed", "canceled")
RANK = {
    "pending": 0,
    "submit_failed": 0,
    "submitted": 1,
    "starting": 2,
    "processing": 3,
    "succeeded": 4,
    "failed": 4,
    "canceled": 4,
}
RESUBMITTABLE = ("failed", "canceled", "submit_failed")
SETTLED = (*TERMINAL, "submit_failed")  # nothing more will happen to the job unless it is sent again

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT PRIMARY KEY,
    input TEXT NOT NULL,               -- JSON
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    prediction_id TEXT,
    outputs TEXT NOT NULL DEFAULT '[]', -- JSON: file path per output index (null: not received yet)
    error TEXT,
    metrics TEXT,                       -- JSON: the prediction's metrics (seeds, timings.*, predict_time)
    logs TEXT,
    added_at REAL NOT NULL,
    submitted_at REAL,                  -- when this attempt was first sent
    started_at REAL,                    -- first webhook of this attempt
    completed_at REAL,                  -- terminal webhook of this attempt
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    dedup TEXT PRIMARY KEY,             -- webhook-id, or the body's sha256
    job TEXT,
    attempt INTEGER,
    prediction_id TEXT,
    status TEXT,
    outcome TEXT NOT NULL,              -- applied, late, stale
    received_at REAL NOT NULL
);
"""


def _row(r: sqlite3.Row | None) -> dict | None:
    if r is None:
        return None
    d = dict(r)
    for k in ("input", "outputs", "metrics"):
        d[k] = json.loads(d[k]) if d[k] is not None else None
    d["timings"] = {
        "queue_and_run_seconds": round(d["completed_at"] - d["submitted_at"], 3)
        if d["completed_at"] and d["submitted_at"]
        else None,
        **((d["metrics"] or {}).get("timings") or {}),
    }
    if (d["metrics"] or {}).get("predict_time") is not None:
        d["timings"]["predict_time"] = d["metrics"]["predict_time"]
    return d


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- reading --------------------------------------------------------------------------------------------
    def get(self, key: str) -> dict | None:
        return _row(self.db.execute("SELECT * FROM jobs WHERE key = ?", (key,)).fetchone())

    def jobs(self, states=None) -> list[dict]:
        rows = self.db.execute("SELECT * FROM jobs ORDER BY added_at, key").fetchall()
        return [j for j in map(_row, rows) if states is None or j["state"] in states]

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

    def events(self, job: str | None = None) -> list[dict]:
        q = "SELECT * FROM events" + (" WHERE job = ?" if job else "") + " ORDER BY received_at"
        return [dict(r) for r in self.db.execute(q, (job,) if job else ()).fetchall()]

    # -- the runner's side ----------------------------------------------------------------------------------
    def add(self, key: str, input: dict) -> bool:
        """Add a job (state pending, attempt 0); False if the key is already in the ledger."""
        now = time.time()
        with self.transaction() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO jobs (key, input, state, added_at, updated_at) VALUES (?, ?, 'pending', ?, ?)",
                (key, json.dumps(input, sort_keys=True), now, now),
            )
            return cur.rowcount == 1

    def new_attempt(self, key: str, prediction_id: str | None = None) -> int:
        """Start attempt n+1 of a job (before it is sent): earlier attempts' late webhooks no longer apply."""
        with self.transaction() as db:
            now = time.time()
            db.execute(
                "UPDATE jobs SET attempt = attempt + 1, state = 'pending', prediction_id = ?, outputs = '[]', "
                "error = NULL, metrics = NULL, logs = NULL, submitted_at = ?, started_at = NULL, "
                "completed_at = NULL, updated_at = ? WHERE key = ?",
                (prediction_id, now, now, key),
            )
            return db.execute("SELECT attempt FROM jobs WHERE key = ?", (key,)).fetchone()[0]

    def submitted(self, key: str, attempt: int, prediction_id: str) -> None:
        """The server accepted the attempt. Webhooks may have come first: the state only moves forward."""
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET prediction_id = ?, updated_at = ?, "
                "state = CASE WHEN state = 'pending' THEN 'submitted' ELSE state END "
                "WHERE key = ? AND attempt = ?",
                (prediction_id, time.time(), key, attempt),
            )

    def submit_failed(self, key: str, attempt: int, error: str) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET state = 'submit_failed', error = ?, updated_at = ? "
                "WHERE key = ? AND attempt = ? AND state = 'pending'",
                (error, time.time(), key, attempt),
            )

    # -- the receiver's side --------------------------------------------------------------------------------
    def seen(self, dedup: str) -> bool:
        return self.db.execute("SELECT 1 FROM events WHERE dedup = ?", (dedup,)).fetchone() is not None

    def apply(self, key: str, attempt: int, dedup: str, payload: dict, files: dict[int, str]) -> str:
        """Apply one webhook message (its output files already on disk: index -> path). Returns the outcome:
        duplicate, unknown (no such job), stale (another attempt or prediction), late (older than what the
        ledger holds), or applied."""
        now = time.time()
        status, pid = payload.get("status"), payload.get("id")
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM events WHERE dedup = ?", (dedup,)).fetchone():
                return "duplicate"
            job = _row(db.execute("SELECT * FROM jobs WHERE key = ?", (key,)).fetchone())
            if job is None:
                return "unknown"
            if attempt != job["attempt"] or (job["prediction_id"] and pid != job["prediction_id"]):
                outcome = "stale"
            elif job["state"] in TERMINAL or RANK.get(status, -1) < RANK[job["state"]]:
                outcome = "late"
            else:
                outcome = "applied"
                self._merge(db, job, payload, files, now)
            db.execute(
                "INSERT INTO events (dedup, job, attempt, prediction_id, status, outcome, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (dedup, key, attempt, pid, status, outcome, now),
            )
            return outcome

    @staticmethod
    def _merge(db, job: dict, payload: dict, files: dict[int, str], now: float) -> None:
        status = payload["status"]
        terminal = status in TERMINAL
        outputs = list(job["outputs"])
        for i, path in files.items():
            outputs.extend([None] * (i + 1 - len(outputs)))
            outputs[i] = path
        logs = payload.get("logs") or ""
        if not terminal and len(job["logs"] or "") > len(logs):  # logs only grow; an older event has less
            logs = job["logs"]
        metrics = payload.get("metrics") or {}
        if not terminal:
            metrics = {**(job["metrics"] or {}), **metrics}
        db.execute(
            "UPDATE jobs SET state = ?, prediction_id = COALESCE(prediction_id, ?), outputs = ?, error = ?, "
            "metrics = ?, logs = ?, started_at = COALESCE(started_at, ?), completed_at = ?, updated_at = ? "
            "WHERE key = ?",
            (
                status,
                payload.get("id"),
                json.dumps(outputs),
                payload.get("error") if terminal else None,
                json.dumps(metrics),
                logs,
                now,
                now if terminal else None,
                now,
                job["key"],
            ),
        )
