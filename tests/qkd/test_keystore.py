"""Per-side key stores and the two-phase commit between them: consume-once semantics per side, every method and
error, recovery of each interrupted step, no key bytes in logs, and crash safety under SIGKILL."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from daemon.qkd.keystore import (SCHEMA_VERSION, BadKeyRequest, BlockStats, KeyConsumed, KeyNotFound, KeyStore,
                                 KeyStoreCorrupt, KeyStoreError, KeyStoreLocked, LinkKeyStores, NotEnoughKeys,
                                 StoredKey)

KEYSTORE_PY = Path(__file__).resolve().parents[2] / "daemon" / "qkd" / "keystore.py"
ST = BlockStats(block_id="b1", n_sifted=100000, qber_z=0.021, qber_x=0.03, leak_ec=15000, f=1.05, eps_sec=1e-10,
                eps_cor=1e-15)


def key_bytes(kid: str, nbytes: int) -> bytes:
    out = b""
    i = 0
    while len(out) < nbytes:
        out += hashlib.sha256(f"{kid}/{i}".encode()).digest()
        i += 1
    return out[:nbytes]


def new_id() -> str:
    return str(uuid.uuid4())


def ready_bytes(path: Path) -> dict[str, bytes]:
    """The ready keys' bytes, read from the file directly (independently of the module)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT key_id, key FROM keys WHERE state='ready'").fetchall())
    finally:
        con.close()


# -- one side's store --------------------------------------------------------------------------------------

def test_pending_commit_get_consume_once(tmp_path):
    with KeyStore(tmp_path / "a.sqlite", "alice") as ks:
        assert ks.side == "alice"
        ids = [new_id() for _ in range(5)]
        for i, kid in enumerate(ids):
            ks.add_pending(kid, key_bytes(kid, 32), 256, link="L", stats=ST, created=1000.0 + i)
        assert ks.pending_ids() == ids and ks.pending_ids("L") == ids and ks.pending_ids("other") == []
        assert all(ks.state_of(k) == "pending" for k in ids)
        assert ks.status() == {"side": "alice", "ready_keys": 0, "ready_bits": 0, "pending": 5, "consumed": 0,
                               "schema_version": SCHEMA_VERSION}
        with pytest.raises(NotEnoughKeys):  # pending keys are not deliverable
            ks.get(1)
        with pytest.raises(KeyNotFound):
            ks.get_by_id(ids[0])
        assert ks.key_ids() == []
        for kid in reversed(ids):
            ks.commit(kid)
        ks.commit(ids[0])  # idempotent when ready
        assert ks.pending_ids() == [] and ks.key_ids() == ids  # oldest (created) first
        assert ks.status()["ready_keys"] == 5 and ks.status()["ready_bits"] == 1280
        got = ks.get(2)
        assert [k.key_id for k in got] == ids[:2]
        k0 = got[0]
        assert isinstance(k0, StoredKey)
        assert (k0.key, k0.size_bits, k0.link, k0.stats, k0.created) == (key_bytes(ids[0], 32), 256, "L", ST, 1000.0)
        assert ks.state_of(ids[0]) == "consumed"
        ks.commit(ids[0])  # idempotent when consumed
        assert ks.get_by_id(ids[4]).key == key_bytes(ids[4], 32)
        for kid in (ids[4], ids[0]):
            with pytest.raises(KeyConsumed):
                ks.get_by_id(kid)
        with pytest.raises(KeyNotFound):
            ks.get_by_id(new_id())
        with pytest.raises(KeyNotFound):
            ks.get_by_id("not-a-uuid")
        with pytest.raises(NotEnoughKeys):
            ks.get(3)  # 2 left: a failed get consumes nothing
        assert ks.key_ids() == ids[2:4]
        assert [k.key_id for k in ks.get(2)] == ids[2:4]
        assert sorted(ks.consumed_ids()) == sorted(ids)
        assert ks.status() == {"side": "alice", "ready_keys": 0, "ready_bits": 0, "pending": 0, "consumed": 5,
                               "schema_version": SCHEMA_VERSION}
        assert ks.check() == [] and ks.check(quick=True) == []


def test_add_pending_commit_discard_errors(tmp_path):
    with KeyStore(tmp_path / "b.sqlite", "bob") as ks:
        kid = new_id()
        ks.add_pending(kid, b"\1" * 16, 128, link="L", stats=ST)
        ks.add_pending(kid.upper(), b"\1" * 16, 128, link="L", stats=ST)  # identical repeat: idempotent
        assert ks.pending_ids() == [kid]
        with pytest.raises(KeyStoreError, match="exists"):
            ks.add_pending(kid, b"\2" * 16, 128, link="L", stats=ST)  # same ID, other bytes
        ks.discard(kid)
        assert ks.state_of(kid) is None and ks.pending_ids() == []
        ks.discard(kid)  # idempotent when absent
        ks.discard(new_id())
        with pytest.raises(KeyNotFound):
            ks.commit(kid)  # a discarded key cannot be committed
        ks.add_pending(kid, b"\1" * 16, 128, link="L", stats=ST)  # never delivered: the ID may be prepared again
        ks.commit(kid)
        with pytest.raises(KeyStoreError, match="exists"):
            ks.add_pending(kid, b"\1" * 16, 128, link="L", stats=ST)
        with pytest.raises(KeyStoreError, match="only pending"):
            ks.discard(kid)
        assert ks.state_of(kid) == "ready"
        ks.get_by_id(kid)
        with pytest.raises(KeyStoreError, match="consumed"):
            ks.discard(kid)
        with pytest.raises(KeyConsumed):  # an ID is never stored again on this side
            ks.add_pending(kid, b"\1" * 16, 128, link="L", stats=ST)
        assert ks.state_of(kid) == "consumed" and ks.state_of("junk") is None
        for bad in (lambda: ks.add_pending(new_id(), b"\1" * 3, 128, link="L", stats=ST),
                    lambda: ks.add_pending(new_id(), b"", 0, link="L", stats=ST),
                    lambda: ks.add_pending(new_id(), b"\1" * 2, 12.5, link="L", stats=ST),
                    lambda: ks.get(0), lambda: ks.get(1, 0), lambda: ks.get(True)):
            with pytest.raises(ValueError):
                bad()
        with pytest.raises(ValueError, match="not a key ID"):
            ks.add_pending("nope", b"\1" * 16, 128, link="L", stats=ST)
        ks.add_pending(new_id(), b"\1\1\x0f", 20, link="L", stats=ST)  # a size that is not whole bytes
        assert ks.check() == []
    with pytest.raises(ValueError):
        KeyStore(tmp_path / "x.sqlite", "eve")


def test_size_and_link_filters(tmp_path):
    with KeyStore(tmp_path / "a.sqlite", "alice") as ks:
        a, b, c = new_id(), new_id(), new_id()
        ks.add_pending(a, b"\1" * 16, 128, link="a", stats=ST, created=1.0)
        ks.add_pending(b, b"\2" * 32, 256, link="b", stats=ST, created=2.0)
        ks.add_pending(c, b"\3" * 32, 256, link="a", stats=ST, created=3.0)
        for kid in (a, b, c):
            ks.commit(kid)
        assert ks.status("a")["ready_keys"] == 2 and ks.status("b")["ready_bits"] == 256
        with pytest.raises(NotEnoughKeys):
            ks.get(2, 128)
        with pytest.raises(NotEnoughKeys):
            ks.get(1, 128, link="b")
        assert [k.key_id for k in ks.get(1, 256)] == [b]
        assert [k.key_id for k in ks.get(2, link="a")] == [a, c]
        assert ks.status("a")["consumed"] == 2


def test_threads_share_a_store_without_double_delivery(tmp_path):
    with KeyStore(tmp_path / "a.sqlite", "alice") as ks:
        ids = [new_id() for _ in range(60)]
        for kid in ids:
            ks.add_pending(kid, key_bytes(kid, 16), 128, link="L", stats=ST)
            ks.commit(kid)
        got: list[str] = []
        errors: list[BaseException] = []

        def worker():
            try:
                while True:
                    try:
                        got.extend(k.key_id for k in ks.get(1))
                    except NotEnoughKeys:
                        return
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and sorted(got) == sorted(ids)


def test_wrong_side_and_cross_side_rows(tmp_path):
    pa, pb = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    kid = new_id()
    with KeyStore(pa, "alice") as a:
        a.add_pending(kid, b"\5" * 16, 128, link="L", stats=ST)
        a.commit(kid)
    KeyStore(pb, "bob").close()
    with pytest.raises(KeyStoreError, match="belongs to side 'alice'"):
        KeyStore(pa, "bob")
    # a row copied from Alice's file into Bob's fails Bob's digest (the side is in the digest)
    con = sqlite3.connect(pb)
    con.execute(f"ATTACH '{pa}' AS other")
    con.execute("INSERT INTO keys SELECT * FROM other.keys")
    con.commit()
    con.close()
    with pytest.raises(KeyStoreCorrupt, match="digest"):
        KeyStore(pb, "bob")


V1_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE keys (key_id TEXT PRIMARY KEY, link TEXT NOT NULL, alice BLOB NOT NULL, bob BLOB NOT NULL,
    size_bits INTEGER NOT NULL, digest BLOB NOT NULL, created REAL NOT NULL, block_id TEXT NOT NULL,
    n_sifted INTEGER NOT NULL, qber_z REAL, qber_x REAL, leak_ec INTEGER, f REAL, eps_sec REAL, eps_cor REAL);
CREATE TABLE consumed (key_id TEXT PRIMARY KEY, link TEXT NOT NULL, size_bits INTEGER NOT NULL,
    created REAL NOT NULL, consumed_at REAL NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO keys VALUES ('6f1c4a36-1c1e-4a57-9f43-3d6f7a2b4c10', 'L', x'0101', x'0101', 16, x'00', 1.0, 'b', 1,
    NULL, NULL, NULL, NULL, NULL, NULL);
"""


def test_v1_store_is_refused_untouched(tmp_path):
    p = tmp_path / "old.sqlite"
    con = sqlite3.connect(p)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(V1_SCHEMA)
    con.close()
    before = p.read_bytes()
    for side in ("alice", "bob"):
        with pytest.raises(KeyStoreError, match="development-version store") as exc_info:
            KeyStore(p, side)
        assert not isinstance(exc_info.value, KeyStoreCorrupt) and "Nothing was modified" in str(exc_info.value)
    assert p.read_bytes() == before
    d = tmp_path / "stores"
    d.mkdir()
    os.replace(p, d / "L.alice.sqlite")
    with pytest.raises(KeyStoreError, match="development-version"):
        LinkKeyStores(d, "L")
    assert (d / "L.alice.sqlite").read_bytes() == before


def test_corrupt_foreign_newer_tampered(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(os.urandom(8192))
    before = bad.read_bytes()
    with pytest.raises(KeyStoreCorrupt, match="bad.sqlite"):
        KeyStore(bad, "alice")
    assert bad.read_bytes() == before
    foreign = tmp_path / "foreign.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(KeyStoreCorrupt, match="not a key store"):
        KeyStore(foreign, "alice")
    newer = tmp_path / "newer.sqlite"
    KeyStore(newer, "alice").close()
    con = sqlite3.connect(newer)
    con.execute("UPDATE meta SET value='99' WHERE name='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(KeyStoreError, match="schema version 99"):
        KeyStore(newer, "alice")
    # a tampered key row is caught by the check on open, by check() and on delivery (nothing consumed)
    p = tmp_path / "tamper.sqlite"
    kid = new_id()
    with KeyStore(p, "bob") as ks:
        ks.add_pending(kid, b"\1" * 16, 128, link="L", stats=ST)
        ks.commit(kid)
    con = sqlite3.connect(p)
    con.execute("UPDATE keys SET key=? WHERE key_id=?", (b"\2" * 16, kid))
    con.commit()
    con.close()
    with pytest.raises(KeyStoreCorrupt, match="digest"):
        KeyStore(p, "bob")
    with KeyStore(p, "bob", check=False) as ks:
        assert ks.check() == [f"key {kid}: digest mismatch"]
        with pytest.raises(KeyStoreCorrupt, match="digest"):
            ks.get_by_id(kid)
        with pytest.raises(KeyStoreCorrupt, match="digest"):
            ks.get(1)
        assert ks.state_of(kid) == "ready" and ks.status()["consumed"] == 0
    ks.close()  # closing twice is harmless
    with pytest.raises(KeyStoreError, match="closed"):
        ks.status()


def test_locked_store_and_link_are_clear_errors(tmp_path):
    p = tmp_path / "a.sqlite"
    KeyStore(p, "alice").close()
    holder = sqlite3.connect(p, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with KeyStore(p, "alice", timeout_s=0.1, check=False) as ks:
            with pytest.raises(KeyStoreLocked, match="locked"):
                ks.add_pending(new_id(), b"\1" * 16, 128, link="L", stats=ST)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with LinkKeyStores(tmp_path / "d", "L", timeout_s=0.1):
        with pytest.raises(KeyStoreLocked, match="held by another process"):
            LinkKeyStores(tmp_path / "d", "L", timeout_s=0.1)
    LinkKeyStores(tmp_path / "d", "L", timeout_s=0.1).close()  # released on close


# -- both sides and the two-phase commit ---------------------------------------------------------------------

def test_link_add_identical_keys_on_both_sides(tmp_path):
    d = tmp_path / "keys" / "sub"
    with LinkKeyStores(d, "link-1") as ls:
        assert ls.recovered == {"committed": 0, "discarded": 0}
        assert ls.alice.side == "alice" and ls.bob.side == "bob"
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        for side in ("alice", "bob"):
            assert stat.S_IMODE((d / f"link-1.{side}.sqlite").stat().st_mode) == 0o600
        ids = []
        for i in range(4):
            kb = key_bytes(str(i), 64)
            ids.append(ls.add(kb, bytearray(kb), 512, stats=ST))
        given = new_id()
        assert ls.add(b"\7" * 16, b"\7" * 16, 128, stats=ST, key_id=given) == given
        with pytest.raises(KeyStoreError, match="exists"):
            ls.add(b"\7" * 16, b"\7" * 16, 128, stats=ST, key_id=given)
        with pytest.raises(ValueError, match="differ"):
            ls.add(b"\1" * 16, b"\2" * 16, 128, stats=ST)
        with pytest.raises(ValueError):
            ls.add(b"\1" * 16, b"\1" * 16, 100, stats=ST)
        assert ls.alice.pending_ids() == [] and ls.bob.pending_ids() == []
        assert ls.alice.key_ids() == ls.bob.key_ids() == ids + [given]
        assert ls.check() == []
        # Alice's application takes keys by number, Bob's by the IDs it was told
        got_a = ls.alice.get(2, 512)
        assert [k.key_id for k in got_a] == ids[:2]
        assert ls.check() == []  # consumed on one side only is consistent
        for ka in got_a:
            kb = ls.bob.get_by_id(ka.key_id)
            assert (kb.key, kb.size_bits, kb.created, kb.stats, kb.link) == \
                (ka.key, ka.size_bits, ka.created, ka.stats, "link-1")
        st = ls.status()
        assert st["alice"]["ready_keys"] == st["bob"]["ready_keys"] == 3
        assert st["alice"]["consumed"] == st["bob"]["consumed"] == 2
        with pytest.raises(KeyConsumed):
            ls.bob.get_by_id(ids[0])
    with LinkKeyStores(d, "link-1") as ls:  # reopen: nothing to recover
        assert ls.recovered == {"committed": 0, "discarded": 0}
        assert ls.alice.key_ids() == ids[2:] + [given]
    for bad in ("", "../x", ".hidden", "a/b", "-x", 3):
        with pytest.raises(ValueError):
            LinkKeyStores(d, bad)


def test_batches_add_many_and_get_by_ids(tmp_path, monkeypatch):
    with LinkKeyStores(tmp_path, "L") as ls:
        given = new_id()
        items = [(None, key_bytes(str(i), 32), key_bytes(str(i), 32)) for i in range(5)]
        items[2] = (given, key_bytes("2", 32), key_bytes("2", 32))
        ids = ls.add_many(items, 256, stats=ST)
        assert len(ids) == 5 and ids[2] == given and ls.add_many([], 256, stats=ST) == []
        assert ls.alice.key_ids() == ls.bob.key_ids() == ids  # block order kept
        with pytest.raises(ValueError, match="differ"):  # one bad pair: nothing stored
            ls.add_many([(None, b"\1" * 32, b"\1" * 32), (None, b"\1" * 32, b"\2" * 32)], 256, stats=ST)
        with pytest.raises(KeyStoreError, match="exists"):  # one existing ID: nothing stored
            ls.add_many([(new_id(), b"\1" * 32, b"\1" * 32), (ids[0], b"\1" * 32, b"\1" * 32)], 256, stats=ST)
        with pytest.raises(ValueError, match="twice"):
            ls.add_many([(given, b"\1" * 32, b"\1" * 32)] * 2, 256, stats=ST)
        with pytest.raises(ValueError, match="not a key ID"):
            ls.add(b"\1" * 32, b"\1" * 32, 256, stats=ST, key_id="block-7/3")
        assert ls.alice.key_ids() == ls.bob.key_ids() == ids and ls.check() == []
        # a block whose commit on Bob's side fails is finished as a whole
        monkeypatch.setattr(ls.bob, "commit_many", lambda kids: (_ for _ in ()).throw(KeyStoreLocked("simulated")))
        m1, m2 = new_id(), new_id()
        with pytest.raises(KeyStoreError, match="committed on Alice's side"):
            ls.add_many([(k, b"\3" * 32, b"\3" * 32) for k in (m1, m2)], 256, stats=ST)
        monkeypatch.undo()
        assert [ls.bob.state_of(k) for k in (m1, m2)] == ["pending", "pending"]
        assert ls.recover() == {"committed": 2, "discarded": 0}
        # get_by_ids: in the requested order, all or none
        got = ls.alice.get_by_ids([ids[3], ids[1]])
        assert [k.key_id for k in got] == [ids[3], ids[1]] and got[0].key == key_bytes("3", 32)
        with pytest.raises(KeyConsumed):
            ls.alice.get_by_ids([ids[0], ids[1]])
        with pytest.raises(KeyNotFound):
            ls.alice.get_by_ids([ids[0], new_id()])
        with pytest.raises(BadKeyRequest, match="twice"):  # a KeyStoreError and a ValueError
            ls.alice.get_by_ids([ids[0], ids[0]])
        with pytest.raises(KeyStoreError):
            ls.alice.get_by_ids([])
        with pytest.raises(ValueError):
            ls.alice.get_by_ids([])
        assert ls.alice.state_of(ids[0]) == "ready"  # nothing consumed by the failed calls
        assert [k.key_id for k in ls.bob.get_by_ids(ids)] == ids
        # commit_many / add_pending_many on one store: all or none
        kid = new_id()
        ls.alice.add_pending_many([(kid, b"\4" * 16)], 128, link="L", stats=ST)
        with pytest.raises(KeyNotFound):
            ls.alice.commit_many([kid, new_id()])
        assert ls.alice.state_of(kid) == "pending"
        with pytest.raises(KeyConsumed):
            ls.bob.add_pending_many([(new_id(), b"\4" * 16), (ids[0], b"\4" * 16)], 128, link="L", stats=ST)
        assert ls.bob.pending_ids() == []
        ls.alice.commit_many([kid, ids[0]])  # ready and consumed IDs: no-ops
        assert ls.alice.state_of(kid) == "ready"


def test_open_directory_is_reported(tmp_path, caplog):
    d = tmp_path / "open"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    with LinkKeyStores(d, "L"):
        pass
    assert "accessible to group/others" in caplog.text
    assert stat.S_IMODE((d / "L.bob.sqlite").stat().st_mode) == 0o600


def _prepare(d: Path, step: int, consume_alice: bool = False) -> str:
    """Leave one key as a crash after ``step`` of the protocol would (0: nothing, 1..4: after that step)."""
    with LinkKeyStores(d, "L") as ls:
        kid = new_id()
        kb = key_bytes(kid, 16)
        if step >= 1:
            ls.alice.add_pending(kid, kb, 128, link="L", stats=ST)
        if step >= 2:
            ls.bob.add_pending(kid, kb, 128, link="L", stats=ST)
        if step >= 3:
            ls.alice.commit(kid)
            if consume_alice:
                ls.alice.get_by_id(kid)
        if step >= 4:
            ls.bob.commit(kid)
    return kid


@pytest.mark.parametrize("step, consume, expect, alice_state, bob_state", [
    (1, False, "discarded", None, None),           # crash after Alice's prepare
    (2, False, "discarded", None, None),           # both prepared, no decision: abort
    (3, False, "committed", "ready", "ready"),     # decided: Bob's commit is finished
    (3, True, "committed", "consumed", "ready"),   # decided and Alice's application took it already
    (4, False, None, "ready", "ready"),            # complete
])
def test_recovery_of_each_step(tmp_path, step, consume, expect, alice_state, bob_state):
    kid = _prepare(tmp_path, step, consume)
    with LinkKeyStores(tmp_path, "L") as ls:
        want = {"committed": 0, "discarded": 0}
        if expect:
            want[expect] = 1
        assert ls.recovered == want
        assert (ls.alice.state_of(kid), ls.bob.state_of(kid)) == (alice_state, bob_state)
        assert ls.check() == []
        assert ls.recover() == {"committed": 0, "discarded": 0}  # idempotent
        if bob_state == "ready":
            assert ls.bob.get_by_id(kid).key == key_bytes(kid, 16)


def test_recovery_of_several_blocks_at_once(tmp_path):
    with LinkKeyStores(tmp_path, "L") as ls:
        decided = [new_id() for _ in range(3)]  # a block after step 3, one of its keys consumed by Alice's app
        undecided = [new_id() for _ in range(4)]  # a block after step 2
        for block, commit in ((decided, True), (undecided, False)):
            items = [(k, key_bytes(k, 16)) for k in block]
            ls.alice.add_pending_many(items, 128, link="L", stats=ST)
            ls.bob.add_pending_many(items, 128, link="L", stats=ST)
            if commit:
                ls.alice.commit_many(block)
        ls.alice.get_by_id(decided[0])
        lone = new_id()  # a step-1 leftover
        ls.alice.add_pending(lone, b"\1" * 16, 128, link="L", stats=ST)
    with LinkKeyStores(tmp_path, "L") as ls:
        assert ls.recovered == {"committed": 3, "discarded": 5}
        assert ls.bob.key_ids() == decided and ls.alice.key_ids() == decided[1:]
        assert all(ls.alice.state_of(k) is None and ls.bob.state_of(k) is None for k in undecided + [lone])
        assert ls.check() == []
        # discard_many: all or none
        kid = new_id()
        ls.bob.add_pending(kid, b"\1" * 16, 128, link="L", stats=ST)
        with pytest.raises(KeyStoreError, match="only pending"):
            ls.bob.discard_many([kid, decided[1]])
        assert ls.bob.state_of(kid) == "pending"
        ls.bob.discard_many([kid, new_id()])
        assert ls.bob.state_of(kid) is None


def test_recovery_bob_pending_only_and_inconsistent_pair(tmp_path):
    # Bob prepared a key Alice never had (in the two-daemon protocol: Alice aborted and forgot it)
    with LinkKeyStores(tmp_path, "L") as ls:
        kid = new_id()
        ls.bob.add_pending(kid, b"\1" * 16, 128, link="L", stats=ST)
        assert ls.recover() == {"committed": 0, "discarded": 1}
        assert ls.bob.state_of(kid) is None
        # Bob ready while Alice pending cannot arise from the protocol: a clear error, nothing deleted
        kid = new_id()
        ls.alice.add_pending(kid, b"\1" * 16, 128, link="L", stats=ST)
        ls.bob.add_pending(kid, b"\1" * 16, 128, link="L", stats=ST)
        ls.bob.commit(kid)
        with pytest.raises(KeyStoreCorrupt, match="pending on Alice"):
            ls.recover()
        assert (ls.alice.state_of(kid), ls.bob.state_of(kid)) == ("pending", "ready")
        assert any("pending" in p for p in ls.check())


def test_add_failures_before_and_after_the_decision(tmp_path, monkeypatch):
    with LinkKeyStores(tmp_path, "L") as ls:
        def fail(*a, **k):
            raise KeyStoreLocked("simulated")

        # Bob's prepare fails: Alice's pending key is discarded, nothing is stored
        monkeypatch.setattr(ls.bob, "add_pending_many", fail)
        with pytest.raises(KeyStoreLocked):
            ls.add(b"\1" * 16, b"\1" * 16, 128, stats=ST, key_id=(k1 := new_id()))
        monkeypatch.undo()
        assert ls.alice.state_of(k1) is None and ls.bob.state_of(k1) is None
        # Alice's commit (the decision) fails: both discarded
        monkeypatch.setattr(ls.alice, "commit_many", fail)
        with pytest.raises(KeyStoreLocked):
            ls.add(b"\1" * 16, b"\1" * 16, 128, stats=ST, key_id=(k2 := new_id()))
        monkeypatch.undo()
        assert ls.alice.state_of(k2) is None and ls.bob.state_of(k2) is None
        # Bob's commit fails after the decision: reported, and finished by the next add
        monkeypatch.setattr(ls.bob, "commit_many", fail)
        with pytest.raises(KeyStoreError, match="committed on Alice's side"):
            ls.add(b"\1" * 16, b"\1" * 16, 128, stats=ST, key_id=(k3 := new_id()))
        monkeypatch.undo()
        assert (ls.alice.state_of(k3), ls.bob.state_of(k3)) == ("ready", "pending")
        k4 = ls.add(b"\2" * 16, b"\2" * 16, 128, stats=ST)
        assert ls.bob.state_of(k3) == ls.bob.state_of(k4) == "ready"
        # ... or by recover()
        monkeypatch.setattr(ls.bob, "commit_many", fail)
        with pytest.raises(KeyStoreError):
            ls.add(b"\1" * 16, b"\1" * 16, 128, stats=ST, key_id=(k5 := new_id()))
        monkeypatch.undo()
        assert ls.recover() == {"committed": 1, "discarded": 0}
        assert ls.bob.state_of(k5) == "ready" and ls.check() == []
        assert ls.alice.key_ids() == ls.bob.key_ids() == [k3, k4, k5]


def test_key_bytes_never_logged_or_in_reprs(tmp_path, caplog, capsys):
    secret = bytes(range(65, 97))  # printable, so a raw leak would be visible as text too
    caplog.set_level(logging.DEBUG)
    texts = []
    with LinkKeyStores(tmp_path, "L") as ls:
        kid = ls.add(secret, secret, 256, stats=ST)
        k2 = ls.add(secret, secret, 256, stats=ST)
        ka = ls.alice.get_by_id(kid)
        kb = ls.bob.get(1)[0]
        for call in (lambda: ls.alice.get_by_id(kid), lambda: ls.add(secret, secret, 256, stats=ST, key_id=k2),
                     lambda: ls.alice.discard(k2), lambda: ls.add(secret, secret[::-1], 256, stats=ST)):
            try:
                call()
            except (KeyStoreError, ValueError) as exc:
                texts.append(f"{exc!r} {exc}")
        ls.bob.add_pending(new_id(), secret, 256, link="L", stats=ST)  # recovered and discarded, with logs
        ls.recover()
        texts += [repr(ka), str(ka), repr(kb), repr(ls), repr(ls.alice), str(ls.status()), str(ls.check())]
    out = capsys.readouterr()
    text = (caplog.text + " ".join(str(r.__dict__) for r in caplog.records) + out.out + out.err + " ".join(texts))
    assert kid in text and "delivered" in caplog.text and "discarded" in caplog.text  # the logs are there, with IDs
    for form in (secret.hex(), secret.hex().upper(), repr(secret), str(list(secret)), secret.decode("latin-1"),
                 secret[:16].decode("latin-1"), base64.b64encode(secret).decode(), secret[::-1].decode("latin-1")):
        assert form not in text


# -- crash safety -----------------------------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import hashlib, importlib.util, random, sys, uuid
    spec = importlib.util.spec_from_file_location("ks", sys.argv[1])
    ks_mod = importlib.util.module_from_spec(spec); sys.modules["ks"] = ks_mod; spec.loader.exec_module(ks_mod)
    def key_bytes(kid, n):
        out = b""; i = 0
        while len(out) < n:
            out += hashlib.sha256(f"{kid}/{i}".encode()).digest(); i += 1
        return out[:n]
    rnd = random.Random(int(sys.argv[3]))
    print("R", flush=True)  # the kill may also land in the open and its recovery
    ls = ks_mod.LinkKeyStores(sys.argv[2], "L")
    print("O", ls.recovered["committed"], ls.recovered["discarded"], flush=True)
    while True:
        r = rnd.random()
        if r < 0.4:
            kid = str(uuid.uuid4()); nb = rnd.choice([16, 128, 4096])
            b = key_bytes(kid, nb)
            ls.add(b, b, nb * 8, key_id=kid, stats=ks_mod.BlockStats(block_id=kid[:8], qber_z=0.02))
            print("A", kid, flush=True)
        elif r < 0.6:  # one block of several keys
            kids = [str(uuid.uuid4()) for _ in range(rnd.randint(2, 6))]; nb = rnd.choice([16, 128])
            ls.add_many([(k, key_bytes(k, nb), key_bytes(k, nb)) for k in kids], nb * 8,
                        stats=ks_mod.BlockStats(block_id=kids[0][:8]))
            print("A", *kids, flush=True)
        else:
            try:
                keys = ls.alice.get(rnd.choice([1, 1, 2, 3]))
            except ks_mod.NotEnoughKeys:
                continue
            for k in keys:
                assert k.key == key_bytes(k.key_id, len(k.key))
                print("GA", k.key_id, flush=True)
            if rnd.random() < 0.5:
                got_b = [ls.bob.get_by_id(k.key_id) for k in keys]
            else:
                got_b = ls.bob.get_by_ids([k.key_id for k in keys])
            for k, kb in zip(keys, got_b):
                assert (kb.key_id, kb.key, kb.created, kb.stats) == (k.key_id, k.key, k.created, k.stats)
                print("GB", k.key_id, flush=True)
""")


@pytest.mark.timeout(max(120, 3 * int(os.environ.get("QNETD_KEYSTORE_KILLS", "80"))))
def test_crash_at_random_points_leaves_both_sides_consistent(tmp_path):
    """A process adding keys through LinkKeyStores (single keys and blocks of 2-6) and consuming some (Alice by
    number, then Bob by the same IDs) is killed with SIGKILL at random points, many times; after every kill the
    reopened (recovered) stores pass their integrity and digest checks, hold the same keys on both sides (except
    keys consumed on one side only) with identical bytes, keep every acknowledged add, and never hand a key out
    twice on a side."""
    kills = int(os.environ.get("QNETD_KEYSTORE_KILLS", "80"))
    d = tmp_path / "stores"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    rnd = random.Random(20261126)
    added: set[str] = set()
    handed = {"alice": [], "bob": []}
    recovered = {"committed": 0, "discarded": 0}
    t0 = time.monotonic()
    for i in range(kills):
        proc = subprocess.Popen([sys.executable, str(script), str(KEYSTORE_PY), str(d), str(i)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "R", proc.stderr.read()
        seen = ""
        if rnd.random() < 0.15:  # kill during the open and its recovery
            time.sleep(rnd.uniform(0.0, 0.005))
        else:  # kill after a random number of acknowledged operations, then a random delay
            for _ in range(1 + rnd.randint(0, 8)):
                line = proc.stdout.readline()
                seen += line
                if not line.endswith("\n"):
                    break
            time.sleep(rnd.uniform(0.0, 0.02))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # read the rest through the same file objects: communicate() would read the pipe directly and lose
        # what readline() has already buffered (acknowledgements lost, lines glued together)
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL, err  # died by the kill, not by an error
        for line in (seen + out).split("\n")[:-1]:  # complete lines only: the kill may cut the last one
            tag, *rest = line.split()
            if tag == "A":
                added.update(rest)
            elif tag == "GA":
                handed["alice"].append(rest[0])
            elif tag == "GB":
                handed["bob"].append(rest[0])
        with LinkKeyStores(d, "L") as ls:  # runs the recovery; raises on a damaged store
            for key, n in ls.recovered.items():
                recovered[key] += n
            assert ls.alice.check() == [] and ls.bob.check() == []  # full integrity check and every digest
            assert ls.check() == []
            assert ls.alice.pending_ids() == [] and ls.bob.pending_ids() == []
            ready = {"alice": set(ls.alice.key_ids()), "bob": set(ls.bob.key_ids())}
            consumed = {"alice": set(ls.alice.consumed_ids()), "bob": set(ls.bob.consumed_ids())}
        for side, other in (("alice", "bob"), ("bob", "alice")):
            assert not ready[side] & consumed[side]
            assert ready[side] - ready[other] <= consumed[other]  # equal except consumed on one side only
            assert added <= ready[side] | consumed[side]  # every acknowledged add is durable on both sides
            assert set(handed[side]) <= consumed[side]  # everything handed out is consumed for good
            assert len(handed[side]) == len(set(handed[side])), f"a key was handed out twice on {side}'s side"
        assert ready["alice"] | consumed["alice"] == ready["bob"] | consumed["bob"]
        raw_a, raw_b = ready_bytes(d / "L.alice.sqlite"), ready_bytes(d / "L.bob.sqlite")
        for kid in ready["alice"] & ready["bob"]:
            assert raw_a[kid] == raw_b[kid] == key_bytes(kid, len(raw_a[kid]))
    elapsed = time.monotonic() - t0
    print(f"\nkeystore crash test: {kills} kills, {len(added)} acknowledged adds, {len(handed['alice'])} keys "
          f"consumed on Alice's side and {len(handed['bob'])} on Bob's, recovery committed "
          f"{recovered['committed']} and discarded {recovered['discarded']}, {len(ready['alice'])} keys ready "
          f"at the end, {elapsed:.1f} s")
    # the kills hit stores that were really in use, and both recovery branches ran
    assert len(added) >= kills // 2 and len(handed["bob"]) >= kills // 8
    assert recovered["committed"] > 0 and recovered["discarded"] > 0
