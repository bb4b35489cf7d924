"""Key store: consume-once semantics, errors, no key bytes in logs, and crash safety under SIGKILL."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from daemon.qkd.keystore import (BlockStats, KeyConsumed, KeyNotFound, KeyStore, KeyStoreCorrupt, KeyStoreError,
                                 KeyStoreLocked, NotEnoughKeys, SCHEMA_VERSION)

KEYSTORE_PY = Path(__file__).resolve().parents[2] / "daemon" / "qkd" / "keystore.py"


def key_bytes(kid: str, nbytes: int) -> bytes:
    out = b""
    i = 0
    while len(out) < nbytes:
        out += hashlib.sha256(f"{kid}/{i}".encode()).digest()
        i += 1
    return out[:nbytes]


def test_add_get_consumes_once(tmp_path):
    with KeyStore(tmp_path / "k.db") as ks:
        st = BlockStats(block_id="b1", n_sifted=100000, qber_z=0.021, qber_x=0.03, leak_ec=15000, f=1.05,
                        eps_sec=1e-10, eps_cor=1e-15)
        ids = [ks.add(key_bytes(str(i), 32), key_bytes(str(i), 32), 256, link="L", stats=st) for i in range(5)]
        assert ks.status() == {"stored_keys": 5, "stored_bits": 1280, "consumed_keys": 0,
                               "schema_version": SCHEMA_VERSION}
        got = ks.get(2)
        assert [k.key_id for k in got] == ids[:2]  # oldest first
        assert got[0].alice == key_bytes("0", 32) and got[0].bob == got[0].alice
        assert got[0].stats == st and got[0].size_bits == 256 and got[0].link == "L"
        k = ks.get_by_id(ids[4])
        assert k.key_id == ids[4]
        with pytest.raises(KeyConsumed):
            ks.get_by_id(ids[4])
        with pytest.raises(KeyConsumed):
            ks.get_by_id(ids[0])
        with pytest.raises(KeyNotFound):
            ks.get_by_id(str(uuid.uuid4()))
        with pytest.raises(KeyNotFound):
            ks.get_by_id("not-a-uuid")
        with pytest.raises(NotEnoughKeys):
            ks.get(3)  # 2 left: nothing consumed by a failed get
        assert ks.status()["stored_keys"] == 2
        assert [k.key_id for k in ks.get(2)] == ids[2:4]
        with pytest.raises(KeyConsumed):  # consumed IDs are never reused
            ks.add(b"\0" * 32, b"\0" * 32, 256, key_id=ids[1])
        assert ks.check() == []


def test_size_and_link_filters_and_validation(tmp_path):
    with KeyStore(tmp_path / "k.db") as ks:
        a = ks.add(b"\1" * 16, b"\1" * 16, 128, link="a")
        b = ks.add(b"\2" * 32, b"\2" * 32, 256, link="b")
        assert [k.key_id for k in ks.get(1, 256)] == [b]
        with pytest.raises(NotEnoughKeys):
            ks.get(1, link="b")
        assert ks.get(1, link="a")[0].key_id == a
        with pytest.raises(ValueError):
            ks.add(b"\1" * 3, b"\1" * 3, 128)
        with pytest.raises(ValueError):
            ks.add(b"\1" * 16, b"\1" * 15, 128)
        kid = str(uuid.uuid4())
        ks.add(b"\1" * 16, b"\1" * 16, 128, key_id=kid)
        with pytest.raises(KeyStoreError, match="exists"):
            ks.add(b"\1" * 16, b"\1" * 16, 128, key_id=kid)


def test_key_bytes_never_logged_or_repr(tmp_path, caplog):
    secret = bytes(range(7, 39))
    caplog.set_level(logging.DEBUG)
    with KeyStore(tmp_path / "k.db") as ks:
        kid = ks.add(secret, secret, 256)
        k = ks.get_by_id(kid)
    text = caplog.text + repr(k) + str(k) + " ".join(str(r.__dict__) for r in caplog.records)
    assert kid in text  # the logs are there, with the ID
    for form in (secret.hex(), repr(secret), str(list(secret)), secret.hex().upper()):
        assert form not in text


def test_corrupt_foreign_and_newer_schema(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(os.urandom(8192))
    with pytest.raises(KeyStoreCorrupt, match="bad.db"):
        KeyStore(bad)
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(KeyStoreCorrupt, match="not a key store"):
        KeyStore(foreign)
    newer = tmp_path / "newer.db"
    KeyStore(newer).close()
    con = sqlite3.connect(newer)
    con.execute("UPDATE meta SET value='99' WHERE name='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(KeyStoreError, match="schema version 99"):
        KeyStore(newer)
    # a tampered key row is caught by the check and on delivery
    p = tmp_path / "tamper.db"
    with KeyStore(p) as ks:
        kid = ks.add(b"\1" * 16, b"\1" * 16, 128)
    con = sqlite3.connect(p)
    con.execute("UPDATE keys SET bob=? WHERE key_id=?", (b"\2" * 16, kid))
    con.commit()
    con.close()
    with pytest.raises(KeyStoreCorrupt, match="digest"):
        KeyStore(p)
    with KeyStore(p, check=False) as ks:
        with pytest.raises(KeyStoreCorrupt, match="digest"):
            ks.get_by_id(kid)
        assert ks.status()["stored_keys"] == 1  # nothing consumed


def test_locked_database_is_a_clear_error(tmp_path):
    p = tmp_path / "k.db"
    KeyStore(p).close()
    holder = sqlite3.connect(p, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with KeyStore(p, timeout=0.1, check=False) as ks:
            with pytest.raises(KeyStoreLocked, match="locked"):
                ks.add(b"\1" * 16, b"\1" * 16, 128)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


WRITER = textwrap.dedent("""
    import hashlib, importlib.util, random, sys, uuid
    spec = importlib.util.spec_from_file_location("ks", sys.argv[1])
    ks_mod = importlib.util.module_from_spec(spec); sys.modules["ks"] = ks_mod; spec.loader.exec_module(ks_mod)
    def key_bytes(kid, n):
        out = b""; i = 0
        while len(out) < n:
            out += hashlib.sha256(f"{kid}/{i}".encode()).digest(); i += 1
        return out[:n]
    ks = ks_mod.KeyStore(sys.argv[2], check=False)
    rnd = random.Random(int(sys.argv[3]))
    print("R", flush=True)
    while True:
        r = rnd.random()
        if r < 0.55:
            kid = str(uuid.uuid4()); nb = rnd.choice([16, 128, 4096])
            b = key_bytes(kid, nb)
            ks.add(b, b, nb * 8, key_id=kid, link="L", stats=ks_mod.BlockStats(block_id=kid[:8], qber_z=0.02))
            print("A", kid, flush=True)
        elif r < 0.85:
            try:
                keys = ks.get(rnd.choice([1, 1, 3]))
            except ks_mod.NotEnoughKeys:
                continue
            for k in keys:
                assert k.alice == key_bytes(k.key_id, len(k.alice)) == k.bob
                print("G", k.key_id, flush=True)
        else:
            ids = ks.key_ids()
            if ids:
                k = ks.get_by_id(rnd.choice(ids))
                assert k.alice == key_bytes(k.key_id, len(k.alice))
                print("G", k.key_id, flush=True)
""")


def test_crash_at_random_points_leaves_store_consistent(tmp_path):
    """A writer/consumer process killed with SIGKILL at random points, many times; after every kill the store
    passes its integrity check, holds no partial key, and no key is ever delivered twice."""
    kills = int(os.environ.get("QNETD_KEYSTORE_KILLS", "80"))
    db = tmp_path / "crash.db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rnd = random.Random(12345)
    added: set[str] = set()
    delivered: list[str] = []
    t_end = time.monotonic() + 25
    done = 0
    for i in range(kills):
        if time.monotonic() > t_end:
            break
        proc = subprocess.Popen([sys.executable, str(script), str(KEYSTORE_PY), str(db), str(i)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "R", proc.stderr.read()
        time.sleep(rnd.uniform(0.0, 0.03))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL, err  # died by the kill, not by an error
        for line in out.split("\n")[:-1]:  # complete lines only: the kill may cut the last one
            tag, _, kid = line.partition(" ")
            if tag == "A":
                added.add(kid)
            elif tag == "G":
                delivered.append(kid)
        with KeyStore(db) as ks:  # opening runs the quick check; raises on damage
            assert ks.check() == []
            stored, consumed = set(ks.key_ids()), set(ks.consumed_ids())
            assert not stored & consumed
            assert set(delivered) <= consumed  # everything handed over is consumed for good
            assert added <= stored | consumed  # every acknowledged add is durable
        done += 1
    assert done >= min(kills, 40), f"only {done} kill cycles in the time budget"
    assert len(delivered) == len(set(delivered)), "a key was delivered twice"
    assert len(added) > 20 and len(delivered) > 10  # the kills hit a store that was really in use
    with KeyStore(db) as ks:
        for k in ks.get(ks.status()["stored_keys"]) if ks.status()["stored_keys"] else []:
            assert k.alice == key_bytes(k.key_id, len(k.alice)) == k.bob  # no partial or mixed-up keys
            assert k.key_id not in delivered
