"""Crash-safe key store: SQLite (WAL, synchronous=FULL), both sides' keys under one key ID, consumed once.

Schema (version 1)
------------------
``meta(name PRIMARY KEY, value)``: ``schema_version``.
``keys``: one row per final key -- ``key_id`` (UUID text, primary key), ``link``, ``alice`` and ``bob`` (the two
sides' key bytes, identical after verification), ``size_bits``, ``digest`` (SHA-256 over the id, size and both
key byte strings), ``created`` (Unix time), block statistics (``block_id``, ``n_sifted``, ``qber_z``, ``qber_x``,
``leak_ec``, ``f``, ``eps_sec``, ``eps_cor``).
``consumed``: ``key_id`` (primary key), ``link``, ``size_bits``, ``created``, ``consumed_at`` -- a tombstone
per delivered key: a key ID is never stored or delivered again.

Crash safety
------------
Every change is one SQLite transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) in WAL mode with
``synchronous=FULL``: a commit is durable once ``COMMIT`` returns, and a process killed at any point leaves
either the whole transaction or none of it (the WAL frames of an uncommitted transaction are ignored on the
next open). So a key row is never partial (the digest is checked on every read and by :meth:`KeyStore.check`),
and consumption -- delete the row, insert its tombstone -- is atomic. Keys are returned only *after* the
consuming transaction committed: a crash between commit and hand-over loses that key (at most once), it
can never be delivered twice. ``secure_delete`` is on, so consumed key bytes are overwritten in the file.

Key bytes never appear in logs or reprs (:class:`StoredKey` hides them); log lines carry IDs and sizes only.
The module imports only the standard library.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "SCHEMA_VERSION",
    "BlockStats",
    "KeyConsumed",
    "KeyNotFound",
    "KeyStore",
    "KeyStoreCorrupt",
    "KeyStoreError",
    "KeyStoreLocked",
    "NotEnoughKeys",
    "StoredKey",
]

SCHEMA_VERSION = 1
log = logging.getLogger("qnetd.qkd.keystore")


class KeyStoreError(RuntimeError):
    """Base class of key store errors."""


class KeyStoreCorrupt(KeyStoreError):
    """The database file is not a valid key store (damaged, foreign, or a digest mismatch)."""


class KeyStoreLocked(KeyStoreError):
    """Another process holds the write lock longer than the timeout."""


class KeyNotFound(KeyStoreError, KeyError):
    pass


class KeyConsumed(KeyStoreError):
    """The key ID exists but was delivered already."""


class NotEnoughKeys(KeyStoreError):
    pass


@dataclass(frozen=True)
class BlockStats:
    """Statistics of the block a key came from (published with it; never secret)."""

    block_id: str = ""
    n_sifted: int = 0
    qber_z: float | None = None
    qber_x: float | None = None
    leak_ec: int | None = None
    f: float | None = None
    eps_sec: float | None = None
    eps_cor: float | None = None


@dataclass(frozen=True)
class StoredKey:
    key_id: str
    link: str
    size_bits: int
    created: float
    stats: BlockStats
    alice: bytes = field(repr=False)
    bob: bytes = field(repr=False)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    link TEXT NOT NULL,
    alice BLOB NOT NULL,
    bob BLOB NOT NULL,
    size_bits INTEGER NOT NULL CHECK (size_bits > 0),
    digest BLOB NOT NULL,
    created REAL NOT NULL,
    block_id TEXT NOT NULL,
    n_sifted INTEGER NOT NULL,
    qber_z REAL, qber_x REAL, leak_ec INTEGER, f REAL, eps_sec REAL, eps_cor REAL
);
CREATE INDEX IF NOT EXISTS keys_by_age ON keys (link, size_bits, created);
CREATE TABLE IF NOT EXISTS consumed (
    key_id TEXT PRIMARY KEY,
    link TEXT NOT NULL,
    size_bits INTEGER NOT NULL,
    created REAL NOT NULL,
    consumed_at REAL NOT NULL
);
"""

_COLS = ("key_id, link, alice, bob, size_bits, digest, created, block_id, n_sifted, qber_z, qber_x, leak_ec, f, "
         "eps_sec, eps_cor")


def _digest(key_id: str, size_bits: int, alice: bytes, bob: bytes) -> bytes:
    h = hashlib.sha256()
    h.update(key_id.encode())
    h.update(int(size_bits).to_bytes(8, "little"))
    h.update(len(alice).to_bytes(8, "little"))
    h.update(alice)
    h.update(bob)
    return h.digest()


def _map_error(exc: sqlite3.Error, path: str) -> KeyStoreError:
    msg = str(exc).lower()
    if "locked" in msg or "busy" in msg:
        return KeyStoreLocked(f"key store {path} is locked by another process ({exc})")
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError) or \
            "malformed" in msg or "not a database" in msg or "corrupt" in msg:
        return KeyStoreCorrupt(f"key store {path} is damaged or not a key store ({exc})")
    return KeyStoreError(f"key store {path}: {exc}")


class KeyStore:
    """One SQLite key store file. Not thread-safe: one instance per thread (processes may share the file)."""

    def __init__(self, path: str | Path, *, timeout: float = 5.0, check: bool = True) -> None:
        self.path = str(path)
        try:
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise _map_error(exc, self.path) from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL").fetchone()
            mode = self._db.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                raise KeyStoreError(f"key store {self.path}: WAL journal mode unavailable (got {mode})")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
            if check:
                problems = self.check(quick=True)
                if problems:
                    raise KeyStoreCorrupt(f"key store {self.path} failed its check: {'; '.join(problems[:3])}")
        except sqlite3.Error as exc:
            self._db.close()
            raise _map_error(exc, self.path) from exc
        except KeyStoreError:
            self._db.close()
            raise

    # -- schema -----------------------------------------------------------------------------------------
    def _migrate(self) -> None:
        row = None
        if self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone():
            row = self._db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        if row is not None and row[0] == str(SCHEMA_VERSION):
            return  # current schema: no write lock needed to open
        self._db.execute("BEGIN IMMEDIATE")
        try:
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "meta" in tables:
                row = self._db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
                version = int(row[0]) if row else None
                if version is None:
                    raise KeyStoreCorrupt(f"key store {self.path}: meta table without schema_version")
                if version > SCHEMA_VERSION:
                    raise KeyStoreError(f"key store {self.path} has schema version {version}; this qnetd "
                                        f"supports up to {SCHEMA_VERSION}")
            elif tables - {"sqlite_sequence"}:
                raise KeyStoreCorrupt(f"key store {self.path}: an SQLite file that is not a key store "
                                      f"(tables {sorted(tables)})")
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            self._db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('schema_version', ?)",
                             (str(SCHEMA_VERSION),))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writes ------------------------------------------------------------------------------------------
    def add(self, alice: bytes, bob: bytes, size_bits: int, *, link: str = "", key_id: str | None = None,
            stats: BlockStats | None = None) -> str:
        """Store one key (both sides) atomically; returns its key ID (a new UUID4 unless given)."""
        alice, bob = bytes(alice), bytes(bob)
        size_bits = int(size_bits)
        if size_bits <= 0 or len(alice) != (size_bits + 7) // 8 or len(bob) != len(alice):
            raise ValueError(f"key of {size_bits} bits needs {(size_bits + 7) // 8} bytes on each side")
        kid = str(uuid.UUID(key_id)) if key_id is not None else str(uuid.uuid4())
        st = stats or BlockStats()
        row = (kid, link, alice, bob, size_bits, _digest(kid, size_bits, alice, bob), time.time(), st.block_id,
               int(st.n_sifted), st.qber_z, st.qber_x, st.leak_ec, st.f, st.eps_sec, st.eps_cor)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._db.execute("SELECT 1 FROM consumed WHERE key_id=?", (kid,)).fetchone():
                    raise KeyConsumed(f"key {kid} was delivered already; key IDs are never reused")
                self._db.execute(f"INSERT INTO keys ({_COLS}) VALUES ({','.join('?' * 15)})", row)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.IntegrityError as exc:
            raise KeyStoreError(f"key {kid} exists already") from exc
        except sqlite3.Error as exc:
            raise _map_error(exc, self.path) from exc
        log.info("key stored", extra={"key_id": kid, "link": link, "size_bits": size_bits})
        return kid

    def _consume(self, rows: list[tuple]) -> list[StoredKey]:
        now = time.time()
        keys = []
        for r in rows:
            kid, link, alice, bob, size, dig, created = r[:7]
            if _digest(kid, size, alice, bob) != dig:
                raise KeyStoreCorrupt(f"key store {self.path}: key {kid} fails its digest")
            keys.append(StoredKey(kid, link, size, created, BlockStats(r[7], r[8], *r[9:15]), alice, bob))
        self._db.executemany("DELETE FROM keys WHERE key_id=?", [(k.key_id,) for k in keys])
        self._db.executemany("INSERT INTO consumed (key_id, link, size_bits, created, consumed_at) "
                             "VALUES (?,?,?,?,?)", [(k.key_id, k.link, k.size_bits, k.created, now) for k in keys])
        return keys

    def get(self, number: int = 1, size_bits: int | None = None, *, link: str | None = None) -> list[StoredKey]:
        """Consume the ``number`` oldest keys (of exactly ``size_bits``, of ``link`` if given) atomically."""
        if number <= 0:
            raise ValueError("number must be positive")
        where, args = [], []
        if link is not None:
            where.append("link=?")
            args.append(link)
        if size_bits is not None:
            where.append("size_bits=?")
            args.append(int(size_bits))
        sql = (f"SELECT {_COLS} FROM keys {'WHERE ' + ' AND '.join(where) if where else ''} "
               f"ORDER BY created, key_id LIMIT ?")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(sql, (*args, int(number))).fetchall()
                if len(rows) < number:
                    raise NotEnoughKeys(f"{len(rows)} key(s) available, {number} requested")
                keys = self._consume(rows)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise _map_error(exc, self.path) from exc
        log.info("keys delivered", extra={"key_ids": [k.key_id for k in keys]})
        return keys

    def get_by_id(self, key_id: str) -> StoredKey:
        """Consume the key ``key_id``; :class:`KeyConsumed` if it was delivered, :class:`KeyNotFound` if unknown."""
        try:
            kid = str(uuid.UUID(str(key_id)))
        except ValueError as exc:
            raise KeyNotFound(f"{key_id!r} is not a key ID (UUID)") from exc
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(f"SELECT {_COLS} FROM keys WHERE key_id=?", (kid,)).fetchall()
                if not rows:
                    if self._db.execute("SELECT 1 FROM consumed WHERE key_id=?", (kid,)).fetchone():
                        raise KeyConsumed(f"key {kid} was delivered already")
                    raise KeyNotFound(f"no key {kid}")
                (key,) = self._consume(rows)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise _map_error(exc, self.path) from exc
        log.info("key delivered", extra={"key_id": kid})
        return key

    # -- reads -------------------------------------------------------------------------------------------
    def status(self, link: str | None = None) -> dict:
        cond, args = ("WHERE link=?", (link,)) if link is not None else ("", ())
        try:
            n, bits = self._db.execute(f"SELECT count(*), coalesce(sum(size_bits), 0) FROM keys {cond}",
                                       args).fetchone()
            c = self._db.execute(f"SELECT count(*) FROM consumed {cond}", args).fetchone()[0]
        except sqlite3.Error as exc:
            raise _map_error(exc, self.path) from exc
        return {"stored_keys": n, "stored_bits": bits, "consumed_keys": c, "schema_version": SCHEMA_VERSION}

    def key_ids(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT key_id FROM keys ORDER BY created, key_id")]

    def consumed_ids(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT key_id FROM consumed")]

    def check(self, quick: bool = False) -> list[str]:
        """Problems found (empty: consistent): SQLite integrity check, digests, sizes, id in both tables."""
        problems: list[str] = []
        try:
            res = [r[0] for r in self._db.execute("PRAGMA quick_check" if quick else "PRAGMA integrity_check")]
            if res != ["ok"]:
                problems.extend(res)
            for kid, alice, bob, size, dig in self._db.execute(
                    "SELECT key_id, alice, bob, size_bits, digest FROM keys"):
                if len(alice) != (size + 7) // 8 or len(bob) != len(alice):
                    problems.append(f"key {kid}: length does not match {size} bits")
                elif _digest(kid, size, alice, bob) != dig:
                    problems.append(f"key {kid}: digest mismatch")
            for (kid,) in self._db.execute("SELECT k.key_id FROM keys k JOIN consumed c USING (key_id)"):
                problems.append(f"key {kid}: stored and consumed")
        except sqlite3.Error as exc:
            raise _map_error(exc, self.path) from exc
        return problems
