"""Crash-safe per-side key stores (SQLite, WAL, synchronous=FULL) and the two-phase commit between them.

Each side of a link -- Alice and Bob -- has its own store file (:class:`KeyStore`): in a deployment the two
daemons run on different machines, each with its own store; today one daemon (one tagger) holds both files of a
link (:class:`LinkKeyStores`). A key has the same ID (a UUID), size, creation time and block statistics on both
sides; consumption is per side (Alice's application takes keys with :meth:`KeyStore.get`, Bob's application
takes the same IDs with :meth:`KeyStore.get_by_id` from Bob's store).

Schema (version 2)
------------------
``meta(name PRIMARY KEY, value)``: ``schema_version`` = 2, ``side`` (``alice`` or ``bob``), ``created``.
``keys``: one row per key of this side -- ``key_id`` (UUID text, primary key), ``link``, ``key`` (this side's
key bytes), ``size_bits``, ``digest`` (SHA-256 over a domain tag, the id, the side, the size and the key bytes),
``state`` (``pending`` or ``ready``), ``created`` (Unix time, the same on both sides), ``committed``, block
statistics (``block_id``, ``n_sifted``, ``qber_z``, ``qber_x``, ``leak_ec``, ``f``, ``eps_sec``, ``eps_cor``).
``consumed``: ``key_id`` (primary key), ``link``, ``size_bits``, ``created``, ``consumed_at`` -- a tombstone
per delivered key: a key ID is never stored or delivered again on that side.

Crash safety of one store
-------------------------
Every change is one SQLite transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) in WAL mode with
``synchronous=FULL``: a change is durable once its method returns, and a process killed at any point leaves the
whole transaction or none of it. A key row is never partial (its digest is checked on every read of key bytes
and by :meth:`KeyStore.check`); consumption -- delete the row, insert its tombstone -- is atomic. Keys are
returned only *after* the consuming transaction committed: a crash between commit and hand-over loses that key
(at most once), it is never delivered twice. ``secure_delete`` is on (freed pages are zeroed in the database
file; older page images may survive in the ``-wal`` file until it is checkpointed and truncated).

Two-phase commit between the sides (:class:`LinkKeyStores`)
-----------------------------------------------------------
1. ``alice.add_pending`` 2. ``bob.add_pending`` (prepare: both durable, not deliverable)
3. ``alice.commit`` -- the decision point: once Alice's key is ready, the key exists;
4. ``bob.commit``.
Recovery (on open and :meth:`LinkKeyStores.recover`): each of Bob's pending keys is committed if Alice's is
ready or consumed, otherwise discarded on both sides (Alice first: her discard is the abort decision); each of
Alice's remaining pending keys is discarded on both sides. So after a crash at any point both sides hold the same
ready keys, except keys already consumed on one side only. Alice is the coordinator: steps 2 and 4 are the ones
that become messages to Bob's daemon (prepare / commit, each acknowledged and retried), and Bob's recovery then
asks Alice for the state of each of his pending keys.

Key bytes never appear in logs or reprs (:class:`StoredKey` hides them); log lines carry IDs and sizes only.
The module imports only the standard library.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

try:  # POSIX: one owner process per link directory entry
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SCHEMA_VERSION",
    "SIDES",
    "BadKeyRequest",
    "BlockStats",
    "KeyConsumed",
    "KeyNotFound",
    "KeyStore",
    "KeyStoreCorrupt",
    "KeyStoreError",
    "KeyStoreLocked",
    "LinkKeyStores",
    "NotEnoughKeys",
    "StoredKey",
]

SCHEMA_VERSION = 2
SIDES = ("alice", "bob")
log = logging.getLogger("qnetd.qkd.keystore")

_LINK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class KeyStoreError(RuntimeError):
    """Base class of key store errors."""


class KeyStoreCorrupt(KeyStoreError):
    """The database file is not a valid key store (damaged, foreign, or a digest mismatch)."""


class KeyStoreLocked(KeyStoreError):
    """Another process holds the write lock (or the link's store files) longer than the timeout."""


class KeyNotFound(KeyStoreError, KeyError):
    """No deliverable key with this ID (unknown, discarded, or still pending)."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


class KeyConsumed(KeyStoreError):
    """The key ID exists but was delivered already (on this side)."""


class NotEnoughKeys(KeyStoreError):
    pass


class BadKeyRequest(KeyStoreError, ValueError):
    """A delivery request the store refuses as such (no IDs, the same ID twice); nothing is consumed."""


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
    """One delivered key of one side. ``key`` is hidden from ``repr``/``str``."""

    key_id: str
    link: str
    key: bytes = field(repr=False)
    size_bits: int
    created: float
    stats: BlockStats


_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE keys (
    key_id TEXT PRIMARY KEY,
    link TEXT NOT NULL,
    key BLOB NOT NULL,
    size_bits INTEGER NOT NULL CHECK (size_bits > 0),
    digest BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'ready')),
    created REAL NOT NULL,
    committed REAL,
    block_id TEXT NOT NULL,
    n_sifted INTEGER NOT NULL,
    qber_z REAL, qber_x REAL, leak_ec INTEGER, f REAL, eps_sec REAL, eps_cor REAL
);
CREATE INDEX keys_by_state_age ON keys (state, link, size_bits, created);
CREATE TABLE consumed (
    key_id TEXT PRIMARY KEY,
    link TEXT NOT NULL,
    size_bits INTEGER NOT NULL,
    created REAL NOT NULL,
    consumed_at REAL NOT NULL
)
"""

_COLS = ("key_id, link, key, size_bits, digest, created, block_id, n_sifted, qber_z, qber_x, leak_ec, f, eps_sec, "
         "eps_cor")

# SQLite primary result codes
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CORRUPT, _SQLITE_NOTADB = 5, 6, 11, 26


def _digest(key_id: str, side: str, size_bits: int, key: bytes) -> bytes:
    h = hashlib.sha256(b"qnetd-keystore-2\0")
    h.update(key_id.encode())
    h.update(b"\0" + side.encode() + b"\0")
    h.update(int(size_bits).to_bytes(8, "little"))
    h.update(len(key).to_bytes(8, "little"))
    h.update(key)
    return h.digest()


def _key_id(key_id: str) -> str:
    """Canonical UUID text; KeyNotFound when ``key_id`` is not a UUID."""
    try:
        return str(uuid.UUID(str(key_id)))
    except ValueError as exc:
        raise KeyNotFound(f"{key_id!r} is not a key ID (UUID)") from exc


def _new_key_id(key_id: str) -> str:
    """Canonical UUID text of a key ID to store; ValueError when it is not a UUID."""
    try:
        return str(uuid.UUID(str(key_id)))
    except ValueError:
        raise ValueError(f"{key_id!r} is not a key ID (UUID)") from None


def _check_size(key: bytes, size_bits: int) -> None:
    if isinstance(size_bits, bool) or int(size_bits) != size_bits or size_bits <= 0:
        raise ValueError(f"size_bits must be a positive integer, got {size_bits!r}")
    if len(key) != (int(size_bits) + 7) // 8:
        raise ValueError(f"a key of {size_bits} bits needs {(int(size_bits) + 7) // 8} bytes, got {len(key)}")


def _map_error(exc: sqlite3.Error, path: str) -> KeyStoreError:
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    msg = str(exc).lower()
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED) or "database is locked" in msg or "database is busy" in msg:
        return KeyStoreLocked(f"key store {path} is locked by another process or connection ({exc})")
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or "malformed" in msg or "not a database" in msg:
        return KeyStoreCorrupt(f"key store {path} is damaged or not a key store ({exc})")
    return KeyStoreError(f"key store {path}: {exc}")


class KeyStore:
    """One side's key store (one SQLite file).

    Thread-safe: every method holds the instance's lock (the connection is opened with
    ``check_same_thread=False``). Several processes may open the same file; writes are serialised by SQLite's
    write lock (:class:`KeyStoreLocked` after ``timeout_s``).
    """

    def __init__(self, path: str | Path, side: str, *, timeout_s: float = 5.0, check: bool = True) -> None:
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        self.path = str(path)
        self.side = side
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        try:  # a new file is created owner-only; SQLite gives its -wal and -shm files the same mode
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            raise KeyStoreError(f"key store {self.path}: cannot create the file ({exc})") from exc
        try:
            db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise _map_error(exc, self.path) from exc
        self._db = db
        try:
            # Look at the file before changing anything in it (journal mode, schema): a foreign, damaged or
            # development-version file is left as it is.
            need_schema = self._inspect()
            db.execute("PRAGMA journal_mode=WAL").fetchone()
            mode = db.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                raise KeyStoreError(f"key store {self.path}: WAL journal mode unavailable (got {mode})")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA secure_delete=ON")
            db.execute("PRAGMA journal_size_limit=1048576")
            if need_schema:
                self._create()
            if check:
                problems = self._check(quick=True)
                if problems:
                    raise KeyStoreCorrupt(f"key store {self.path} failed its check: {'; '.join(problems[:3])}")
        except sqlite3.Error as exc:
            self.close()
            raise _map_error(exc, self.path) from exc
        except BaseException:
            self.close()
            raise

    # -- schema -----------------------------------------------------------------------------------------
    def _inspect(self) -> bool:
        """Validate an existing file (version, side); True if it is empty and needs the schema."""
        db = self._connection()
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables:
            if tables - {"sqlite_sequence"}:
                raise KeyStoreCorrupt(f"key store {self.path}: an SQLite file that is not a key store "
                                      f"(tables {sorted(tables)})")
            return True
        meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
        version = meta.get("schema_version")
        if version is None or not str(version).isdigit():
            raise KeyStoreCorrupt(f"key store {self.path}: not a key store (meta without a schema_version)")
        version = int(version)
        if version == 1:
            raise KeyStoreError(
                f"key store {self.path} is a development-version store (schema 1: both sides' keys in one file); "
                f"this qnetd uses one store per side (schema {SCHEMA_VERSION}). Nothing was modified; move the "
                f"file away (its keys are not carried over)")
        if version > SCHEMA_VERSION:
            raise KeyStoreError(f"key store {self.path} has schema version {version}; this qnetd supports "
                                f"{SCHEMA_VERSION} (a newer qnetd wrote it)")
        if version != SCHEMA_VERSION:
            raise KeyStoreCorrupt(f"key store {self.path}: unknown schema version {version}")
        side = meta.get("side")
        if side != self.side:
            raise KeyStoreError(f"key store {self.path} belongs to side {side!r}, opened as {self.side!r}")
        if not {"keys", "consumed"} <= tables:
            raise KeyStoreCorrupt(f"key store {self.path}: tables missing ({sorted({'keys', 'consumed'} - tables)})")
        return False

    def _create(self) -> None:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone():
                db.execute("ROLLBACK")  # another process created it meanwhile: validate theirs
                if self._inspect():
                    raise KeyStoreCorrupt(f"key store {self.path}: incomplete schema")
                return
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.executemany("INSERT INTO meta (name, value) VALUES (?, ?)",
                           [("schema_version", str(SCHEMA_VERSION)), ("side", self.side),
                            ("created", repr(time.time()))])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        log.info("key store %s created (side %s, schema %d)", self.path, self.side, SCHEMA_VERSION)

    # -- plumbing ----------------------------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise KeyStoreError(f"key store {self.path} is closed")
        return self._db

    @contextmanager
    def _tx(self):
        """One write transaction (BEGIN IMMEDIATE ... COMMIT) under the instance lock; rollback on any error."""
        with self._lock:
            db = self._connection()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise _map_error(exc, self.path) from exc

    @contextmanager
    def _read(self):
        with self._lock:
            db = self._connection()
            try:
                yield db
            except sqlite3.Error as exc:
                raise _map_error(exc, self.path) from exc

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                try:
                    self._db.close()
                finally:
                    self._db = None

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KeyStore({self.path!r}, side={self.side!r})"

    # -- two-phase writes ----------------------------------------------------------------------------------
    def add_pending(self, key_id: str, key: bytes, size_bits: int, *, link: str, stats: BlockStats,
                    created: float | None = None) -> None:
        """Phase 1: store ``key`` as pending (not deliverable); durable on return.

        Idempotent for an identical pending key (a repeated prepare). :class:`KeyConsumed` if the ID was
        delivered on this side, :class:`KeyStoreError` if it exists otherwise."""
        self.add_pending_many([(key_id, key)], size_bits, link=link, stats=stats, created=created)

    def add_pending_many(self, items: list[tuple[str, bytes]], size_bits: int, *, link: str, stats: BlockStats,
                         created: float | None = None) -> None:
        """:meth:`add_pending` for several ``(key_id, key)`` of one block in one transaction: all or none."""
        rows = []
        st = stats if stats is not None else BlockStats()
        when = time.time() if created is None else float(created)
        for key_id, key in items:
            kid = _new_key_id(key_id)
            key = bytes(key)
            _check_size(key, size_bits)
            rows.append((kid, link, key, int(size_bits), _digest(kid, self.side, int(size_bits), key), "pending", when,
                         st.block_id, int(st.n_sifted), st.qber_z, st.qber_x, st.leak_ec, st.f, st.eps_sec,
                         st.eps_cor))
        if len({r[0] for r in rows}) != len(rows):
            raise ValueError("the same key ID twice in one batch")
        new = []
        with self._tx() as db:
            for row in rows:
                kid, dig = row[0], row[4]
                if db.execute("SELECT 1 FROM consumed WHERE key_id=?", (kid,)).fetchone():
                    raise KeyConsumed(f"key {kid} was delivered already on side {self.side}; IDs are never reused")
                old = db.execute("SELECT state, digest, link FROM keys WHERE key_id=?", (kid,)).fetchone()
                if old is not None:
                    if old[0] == "pending" and hmac.compare_digest(old[1], dig) and old[2] == link:
                        continue  # a repeated prepare
                    raise KeyStoreError(f"key {kid} exists already on side {self.side} ({old[0]})")
                new.append(row)
            db.executemany("INSERT INTO keys (key_id, link, key, size_bits, digest, state, created, block_id, "
                           "n_sifted, qber_z, qber_x, leak_ec, f, eps_sec, eps_cor) "
                           "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", new)
        for row in new:
            log.debug("key %s pending on side %s (%d bits, link %s)", row[0], self.side, row[3], link)

    def commit(self, key_id: str) -> None:
        """Phase 2: pending -> ready (deliverable). Idempotent if ready or consumed; KeyNotFound if unknown."""
        self.commit_many([key_id])

    def commit_many(self, key_ids: list[str]) -> None:
        """:meth:`commit` for several IDs in one transaction: all or none (KeyNotFound for an unknown ID)."""
        kids = [_key_id(k) for k in key_ids]
        done = []
        with self._tx() as db:
            now = time.time()
            for kid in kids:
                row = db.execute("SELECT state FROM keys WHERE key_id=?", (kid,)).fetchone()
                if row is None:
                    if db.execute("SELECT 1 FROM consumed WHERE key_id=?", (kid,)).fetchone():
                        continue
                    raise KeyNotFound(f"no key {kid} on side {self.side} to commit")
                if row[0] == "pending":
                    db.execute("UPDATE keys SET state='ready', committed=? WHERE key_id=?", (now, kid))
                    done.append(kid)
        for kid in done:
            log.info("key %s ready on side %s", kid, self.side)

    def discard(self, key_id: str) -> None:
        """Delete a pending key (idempotent if absent). A ready or consumed key is never deleted: KeyStoreError."""
        self.discard_many([key_id])

    def discard_many(self, key_ids: list[str]) -> None:
        """:meth:`discard` for several IDs in one transaction: all or none."""
        kids = [_key_id(k) for k in key_ids]
        done = []
        with self._tx() as db:
            for kid in kids:
                row = db.execute("SELECT state FROM keys WHERE key_id=?", (kid,)).fetchone()
                if row is None:
                    if db.execute("SELECT 1 FROM consumed WHERE key_id=?", (kid,)).fetchone():
                        raise KeyStoreError(f"key {kid} was consumed on side {self.side}; it cannot be discarded")
                    continue
                if row[0] != "pending":
                    raise KeyStoreError(f"key {kid} is {row[0]} on side {self.side}; only pending keys are "
                                        f"discarded")
                db.execute("DELETE FROM keys WHERE key_id=?", (kid,))
                done.append(kid)
        for kid in done:
            log.info("key %s discarded on side %s", kid, self.side)

    # -- delivery --------------------------------------------------------------------------------------------
    def _consume(self, db: sqlite3.Connection, rows: list[tuple]) -> list[StoredKey]:
        keys = []
        for r in rows:
            kid, link, key, size, dig, created = r[:6]
            if len(key) != (size + 7) // 8 or not hmac.compare_digest(_digest(kid, self.side, size, key), dig):
                raise KeyStoreCorrupt(f"key store {self.path}: key {kid} fails its digest")
            keys.append(StoredKey(kid, link, key, size, created, BlockStats(r[6], r[7], *r[8:14])))
        now = time.time()
        db.executemany("DELETE FROM keys WHERE key_id=?", [(k.key_id,) for k in keys])
        db.executemany("INSERT INTO consumed (key_id, link, size_bits, created, consumed_at) VALUES (?,?,?,?,?)",
                       [(k.key_id, k.link, k.size_bits, k.created, now) for k in keys])
        return keys

    def get(self, number: int = 1, size_bits: int | None = None, *, link: str | None = None) -> list[StoredKey]:
        """Consume the ``number`` oldest ready keys (of exactly ``size_bits`` and ``link`` if given) atomically:
        all of them or none (:class:`NotEnoughKeys`)."""
        if isinstance(number, bool) or int(number) != number or number <= 0:
            raise ValueError(f"number must be a positive integer, got {number!r}")
        where, args = ["state='ready'"], []
        if link is not None:
            where.append("link=?")
            args.append(link)
        if size_bits is not None:
            if int(size_bits) != size_bits or size_bits <= 0:
                raise ValueError(f"size_bits must be a positive integer, got {size_bits!r}")
            where.append("size_bits=?")
            args.append(int(size_bits))
        sql = f"SELECT {_COLS} FROM keys WHERE {' AND '.join(where)} ORDER BY created, rowid LIMIT ?"
        with self._tx() as db:
            rows = db.execute(sql, (*args, int(number))).fetchall()
            if len(rows) < number:
                raise NotEnoughKeys(f"{len(rows)} ready key(s) on side {self.side}, {number} requested")
            keys = self._consume(db, rows)
        log.info("keys %s delivered on side %s", ", ".join(k.key_id for k in keys), self.side)
        return keys

    def get_by_id(self, key_id: str) -> StoredKey:
        """Consume the ready key ``key_id``: :class:`KeyConsumed` if it was delivered on this side,
        :class:`KeyNotFound` if unknown or still pending."""
        return self.get_by_ids([key_id])[0]

    def get_by_ids(self, key_ids: list[str]) -> list[StoredKey]:
        """Consume the ready keys ``key_ids`` (returned in that order) atomically: all or none -- one delivered
        ID is :class:`KeyConsumed`, one unknown or pending ID :class:`KeyNotFound`, and nothing is consumed."""
        kids = [_key_id(k) for k in key_ids]
        if not kids:
            raise BadKeyRequest("no key IDs")
        if len(set(kids)) != len(kids):
            raise BadKeyRequest("the same key ID twice in one request")
        with self._tx() as db:
            rows = []
            for kid in kids:
                row = db.execute(f"SELECT {_COLS} FROM keys WHERE key_id=? AND state='ready'", (kid,)).fetchone()
                if row is None:
                    if db.execute("SELECT 1 FROM consumed WHERE key_id=?", (kid,)).fetchone():
                        raise KeyConsumed(f"key {kid} was delivered already on side {self.side}")
                    raise KeyNotFound(f"no ready key {kid} on side {self.side}")
                rows.append(row)
            keys = self._consume(db, rows)
        log.info("keys %s delivered on side %s", ", ".join(k.key_id for k in keys), self.side)
        return keys

    # -- reads -----------------------------------------------------------------------------------------------
    def pending_ids(self, link: str | None = None) -> list[str]:
        cond, args = (" AND link=?", (link,)) if link is not None else ("", ())
        with self._read() as db:
            return [r[0] for r in db.execute(f"SELECT key_id FROM keys WHERE state='pending'{cond} "
                                             f"ORDER BY created, rowid", args)]

    def state_of(self, key_id: str) -> str | None:
        """``"pending"``, ``"ready"``, ``"consumed"`` or None (unknown or discarded)."""
        try:
            kid = str(uuid.UUID(str(key_id)))
        except ValueError:
            return None
        with self._read() as db:
            row = db.execute("SELECT state FROM keys WHERE key_id=?", (kid,)).fetchone()
            if row is not None:
                return row[0]
            if db.execute("SELECT 1 FROM consumed WHERE key_id=?", (kid,)).fetchone():
                return "consumed"
            return None

    def status(self, link: str | None = None) -> dict:
        cond, args = (" AND link=?", (link,)) if link is not None else ("", ())
        with self._read() as db:
            n, bits = db.execute(f"SELECT count(*), coalesce(sum(size_bits), 0) FROM keys WHERE state='ready'{cond}",
                                 args).fetchone()
            p = db.execute(f"SELECT count(*) FROM keys WHERE state='pending'{cond}", args).fetchone()[0]
            c = db.execute(f"SELECT count(*) FROM consumed WHERE 1{cond}", args).fetchone()[0]
        return {"side": self.side, "ready_keys": n, "ready_bits": bits, "pending": p, "consumed": c,
                "schema_version": SCHEMA_VERSION}

    def key_ids(self) -> list[str]:
        """IDs of the ready (deliverable) keys, oldest first; pending ones: :meth:`pending_ids`."""
        with self._read() as db:
            return [r[0] for r in db.execute("SELECT key_id FROM keys WHERE state='ready' ORDER BY created, rowid")]

    def consumed_ids(self) -> list[str]:
        with self._read() as db:
            return [r[0] for r in db.execute("SELECT key_id FROM consumed ORDER BY consumed_at, key_id")]

    def _fingerprints(self) -> dict[str, bytes]:
        """Side-independent SHA-256 of each ready key (for the cross-side check; never the bytes themselves)."""
        with self._read() as db:
            return {kid: hashlib.sha256(key).digest()
                    for kid, key in db.execute("SELECT key_id, key FROM keys WHERE state='ready'")}

    def check(self, quick: bool = False) -> list[str]:
        """Problems found (empty: consistent): SQLite integrity check, meta, digests, sizes, states, an ID both
        stored and consumed."""
        with self._lock:
            try:
                return self._check(quick)
            except sqlite3.Error as exc:
                raise _map_error(exc, self.path) from exc

    def _check(self, quick: bool) -> list[str]:
        db = self._connection()
        problems: list[str] = []
        res = [r[0] for r in db.execute("PRAGMA quick_check" if quick else "PRAGMA integrity_check")]
        if res != ["ok"]:
            problems.extend(res)
        meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
        if meta.get("side") != self.side or meta.get("schema_version") != str(SCHEMA_VERSION):
            problems.append(f"meta: side {meta.get('side')!r}, schema {meta.get('schema_version')!r}")
        for kid, key, size, dig, state in db.execute("SELECT key_id, key, size_bits, digest, state FROM keys"):
            if state not in ("pending", "ready"):
                problems.append(f"key {kid}: unknown state {state!r}")
            if not isinstance(key, bytes) or len(key) != (size + 7) // 8:
                problems.append(f"key {kid}: length does not match {size} bits")
            elif not hmac.compare_digest(_digest(kid, self.side, size, key), dig):
                problems.append(f"key {kid}: digest mismatch")
        for (kid,) in db.execute("SELECT k.key_id FROM keys k JOIN consumed c USING (key_id)"):
            problems.append(f"key {kid}: stored and consumed")
        return problems


class LinkKeyStores:
    """Both sides' stores of one link held by this daemon, and the two-phase commit between them.

    Files ``<directory>/<link>.alice.sqlite`` and ``<link>.bob.sqlite`` (the directory is created with mode
    0o700, the files 0o600). One process owns a link's stores at a time (an exclusive ``flock`` on
    ``<link>.lock``; :class:`KeyStoreLocked` after ``timeout_s``), because recovery on open must not race an
    add in progress in another process. Opening runs :meth:`recover`; ``recovered`` says what it did.
    """

    def __init__(self, directory: str | Path, link: str, *, timeout_s: float = 5.0) -> None:
        if not isinstance(link, str) or not _LINK_NAME.match(link):
            raise ValueError(f"link name {link!r}: letters, digits, '_', '.', '-' only, not starting with '.'/'-'")
        self.directory = Path(directory)
        self.link = link
        self._lock = threading.RLock()
        self._lock_fd: int | None = None
        self.alice: KeyStore | None = None  # type: ignore[assignment]
        self.bob: KeyStore | None = None  # type: ignore[assignment]
        self._unfinished: set[str] = set()  # IDs an add could not finish or undo: resolved by the next add/recover
        if not self.directory.exists():
            try:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(self.directory, 0o700)  # mkdir's mode is filtered by the umask
            except OSError as exc:
                raise KeyStoreError(f"key store directory {self.directory}: {exc}") from exc
        elif self.directory.is_dir() and self.directory.stat().st_mode & 0o077:
            log.warning("key store directory %s is accessible to group/others (mode %o); 0o700 is expected",
                        self.directory, self.directory.stat().st_mode & 0o777)
        try:
            self._take_lock(timeout_s)
            self.alice = KeyStore(self.directory / f"{link}.alice.sqlite", "alice", timeout_s=timeout_s)
            self.bob = KeyStore(self.directory / f"{link}.bob.sqlite", "bob", timeout_s=timeout_s)
            self.recovered = self.recover()
        except BaseException:
            self.close()
            raise
        if self.recovered["committed"] or self.recovered["discarded"]:
            log.warning("link %s key stores recovered: %d key(s) committed on Bob's side, %d discarded", link,
                        self.recovered["committed"], self.recovered["discarded"])

    def _take_lock(self, timeout_s: float) -> None:
        if fcntl is None:  # pragma: no cover
            return
        path = self.directory / f"{self.link}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KeyStoreError(f"key store lock {path}: {exc}") from exc
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise KeyStoreLocked(f"key stores of link {self.link} in {self.directory} are held by another "
                                         f"process (lock {path})") from None
                time.sleep(0.02)
        self._lock_fd = fd

    def close(self) -> None:
        with self._lock:
            for store in (self.alice, self.bob):
                if store is not None:
                    store.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> LinkKeyStores:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LinkKeyStores({str(self.directory)!r}, {self.link!r})"

    # -- protocol --------------------------------------------------------------------------------------------
    # Alice is the coordinator. Steps (2) and (4) are local calls now; between two daemons they become messages
    # over the authenticated channel -- PREPARE(key_id, size, created, stats) answered PREPARED after Bob's
    # add_pending returned (durable), COMMIT(key_id) answered COMMITTED, both retried until answered (Bob's
    # add_pending and commit are idempotent for that reason). Bob's recovery becomes a STATE?(key_id) query to
    # Alice per pending key; Alice discards her pending key before answering "abort", so she can never commit
    # it later.

    def add(self, alice: bytes, bob: bytes, size_bits: int, *, stats: BlockStats, key_id: str | None = None) -> str:
        """Store one verified key on both sides with the two-phase commit; returns its ID (a new UUID4 unless
        given). On an error before the decision point nothing is stored on either side."""
        return self.add_many([(key_id, alice, bob)], size_bits, stats=stats)[0]

    def add_many(self, items: list[tuple[str | None, bytes, bytes]], size_bits: int, *,
                 stats: BlockStats) -> list[str]:
        """Store the keys ``(key_id or None, alice, bob)`` of one block on both sides with one two-phase commit
        (each step one transaction for all of them): after a crash at any point all of them are stored on both
        sides (ready, or consumed meanwhile) or none is. Returns their IDs."""
        kids, a_items, b_items = [], [], []
        for key_id, alice, bob in items:
            alice, bob = bytes(alice), bytes(bob)
            _check_size(alice, size_bits)
            if len(bob) != len(alice) or not hmac.compare_digest(alice, bob):
                raise ValueError("Alice's and Bob's keys differ: only verified (identical) keys are stored")
            kid = str(uuid.uuid4()) if key_id is None else _new_key_id(key_id)
            kids.append(kid)
            a_items.append((kid, alice))
            b_items.append((kid, bob))
        if not kids:
            return []
        created = time.time()
        with self._lock:
            if self._unfinished:
                self._finish_unfinished()
            # (1) prepare on Alice's side
            self.alice.add_pending_many(a_items, size_bits, link=self.link, stats=stats, created=created)
            # (2) prepare on Bob's side (later: PREPARE message to Bob's daemon)
            try:
                self.bob.add_pending_many(b_items, size_bits, link=self.link, stats=stats, created=created)
            except BaseException:
                self._abort(kids)
                raise
            # (3) the decision point: from here on the keys exist
            try:
                self.alice.commit_many(kids)
            except BaseException:
                # normally the commit did not happen; resolve these IDs by the recovery rule whatever their state
                for kid in kids:
                    try:
                        self._resolve(kid)
                    except Exception:  # noqa: BLE001 - the original error is the one to report
                        self._unfinished.add(kid)
                        log.exception("link %s: key %s unresolved after a failed commit; the next add or "
                                      "recover() resolves it", self.link, kid)
                raise
            # (4) Bob commits (later: COMMIT message to Bob's daemon, retried until acknowledged)
            try:
                self.bob.commit_many(kids)
            except KeyStoreError as exc:
                self._unfinished.update(kids)
                raise KeyStoreError(f"link {self.link}: key(s) {', '.join(kids)} committed on Alice's side but "
                                    f"Bob's commit failed ({exc}); finished by the next add or recover()") from exc
        log.info("link %s: key(s) %s stored on both sides (%d bits each)", self.link, ", ".join(kids),
                 int(size_bits))
        return kids

    def _abort(self, kids: list[str]) -> None:
        """Undo a prepare before the decision point: Alice's pending keys first (the abort decision), then Bob's."""
        for store in (self.alice, self.bob):
            for kid in kids:
                try:
                    if store.state_of(kid) == "pending":
                        store.discard(kid)
                except Exception:  # noqa: BLE001 - best effort; the next add or recover() cleans up what remains
                    self._unfinished.add(kid)
                    log.exception("link %s: discarding key %s on side %s failed", self.link, kid, store.side)

    def _resolve(self, kid: str) -> str:
        """Apply the recovery rule to one ID: "committed", "discarded" or "" (nothing to do)."""
        a, b = self.alice.state_of(kid), self.bob.state_of(kid)
        if b == "pending":
            if a in ("ready", "consumed"):
                self.bob.commit(kid)
                return "committed"
            if a == "pending":
                self.alice.discard(kid)
            self.bob.discard(kid)
            return "discarded"
        if a == "pending":
            if b in ("ready", "consumed"):  # impossible in the protocol: Bob commits only after Alice
                raise KeyStoreCorrupt(f"link {self.link}: key {kid} is {b} on Bob's side but pending on Alice's")
            self.alice.discard(kid)
            self.bob.discard(kid)  # absent: no-op
            return "discarded"
        return ""

    def _finish_unfinished(self) -> None:
        for kid in sorted(self._unfinished):
            try:
                self._resolve(kid)
                self._unfinished.discard(kid)
            except KeyStoreError:
                log.warning("link %s: key %s still unfinished on Bob's side", self.link, kid)

    def recover(self) -> dict:
        """Finish or undo every interrupted add: returns {"committed": n, "discarded": n} (keys).

        Batched (a block's keys in one transaction per step), in an order that a crash during recovery cannot
        spoil: Bob's commits of decided keys, then Alice's discards (the abort decision), then Bob's discards."""
        with self._lock:
            a_pending, b_pending = self.alice.pending_ids(), self.bob.pending_ids()
            commit, abort = [], []
            for kid in b_pending:
                a = self.alice.state_of(kid)
                (commit if a in ("ready", "consumed") else abort).append(kid)
            in_abort = set(abort)
            for kid in a_pending:
                if kid in in_abort:
                    continue
                b = self.bob.state_of(kid)
                if b in ("ready", "consumed"):  # impossible in the protocol: Bob commits only after Alice
                    raise KeyStoreCorrupt(f"link {self.link}: key {kid} is {b} on Bob's side but pending on "
                                          f"Alice's")
                abort.append(kid)
            if commit:
                self.bob.commit_many(commit)
            if abort:
                self.alice.discard_many(abort)  # absent ones: no-op
                self.bob.discard_many(abort)
            self._unfinished.clear()
        return {"committed": len(commit), "discarded": len(abort)}

    def status(self) -> dict:
        return {"link": self.link, "alice": self.alice.status(), "bob": self.bob.status()}

    def check(self, quick: bool = False) -> list[str]:
        """Both stores' checks, plus the cross-side invariants: no pending key outside an add, every ready key
        ready or consumed on the other side with identical bytes."""
        with self._lock:
            problems = [f"alice: {p}" for p in self.alice.check(quick)] + [f"bob: {p}" for p in self.bob.check(quick)]
            for store in (self.alice, self.bob):
                problems += [f"{store.side}: key {k} pending" for k in store.pending_ids()]
            fa, fb = self.alice._fingerprints(), self.bob._fingerprints()
            ca, cb = set(self.alice.consumed_ids()), set(self.bob.consumed_ids())
            problems += [f"key {k} ready on Alice's side, missing on Bob's" for k in sorted(fa.keys() - fb.keys() - cb)]
            problems += [f"key {k} ready on Bob's side, missing on Alice's" for k in sorted(fb.keys() - fa.keys() - ca)]
            problems += [f"key {k} differs between the sides" for k in sorted(fa.keys() & fb.keys())
                         if not hmac.compare_digest(fa[k], fb[k])]
        return problems
