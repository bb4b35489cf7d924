"""CURVE key files, keygen, [daemon.curve] validation, the ZAP decision and client key handling."""

from __future__ import annotations

import os
import shutil
import stat

import pytest
import zmq
import zmq.auth
from zmq.utils import z85

from daemon import cli
from daemon.api.security import KeyFileError, ZapHandler, keygen, load_authorized, load_public_key, load_secret_key
from daemon.client import Client
from daemon.config import ConfigError, validate


@pytest.fixture
def keys(tmp_path):
    d = tmp_path / "keys"
    server = keygen(d, "server")
    alice = keygen(d, "alice")
    auth = tmp_path / "authorized"
    auth.mkdir()
    shutil.copy(alice[0], auth / "alice.key")
    return {"server": server, "alice": alice, "authorized": auth}


def curve_raw(keys, **daemon):
    return {"daemon": {**daemon, "curve": {"server_secret_key": str(keys["server"][1]),
                                           "authorized_clients": str(keys["authorized"])}}}


def problems(raw) -> str:
    with pytest.raises(ConfigError) as ei:
        validate(raw)
    return str(ei.value)


# -- keygen ------------------------------------------------------------------------------------------------

def test_keygen_modes_format_and_no_overwrite(tmp_path):
    old = os.umask(0)  # even with a permissive umask the secret is 0600
    try:
        pub, sec = keygen(tmp_path / "k", "node")
    finally:
        os.umask(old)
    assert (pub.name, sec.name) == ("node.key", "node.key_secret")
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) & 0o077 != 0o077  # public: readable, but not world-writable
    assert zmq.auth.load_certificate(str(pub))[0] == load_public_key(pub)  # pyzmq can read our files
    public, secret = zmq.auth.load_certificate(str(sec))
    assert load_secret_key(sec) == (public, secret)
    assert zmq.curve_public(secret) == public
    before = sec.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        keygen(tmp_path / "k", "node")
    assert sec.read_bytes() == before
    with pytest.raises(ValueError):
        keygen(tmp_path / "k", "../evil")


def test_cli_keygen(tmp_path, capsys):
    assert cli.main(["keygen", "--out", str(tmp_path), "--name", "lab"]) == 0
    out = capsys.readouterr().out
    secret = load_secret_key(tmp_path / "lab.key_secret")[1].decode()
    assert secret not in out and "lab.key_secret" in out
    assert cli.main(["keygen", "--out", str(tmp_path), "--name", "lab"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


# -- key files ---------------------------------------------------------------------------------------------

def test_secret_key_readable_by_others_is_refused(keys):
    sec = keys["server"][1]
    secret = load_secret_key(sec)[1].decode()
    sec.chmod(0o640)
    with pytest.raises(KeyFileError, match="chmod 600") as ei:
        load_secret_key(sec)
    assert secret not in str(ei.value)


def test_malformed_and_missing_key_files(tmp_path, keys):
    bad = tmp_path / "bad.key_secret"
    bad.write_text('secret-key = "tooshort"\n')
    bad.chmod(0o600)
    with pytest.raises(KeyFileError, match="not a 40-character Z85"):
        load_secret_key(bad)
    with pytest.raises(KeyFileError, match="no such file"):
        load_secret_key(tmp_path / "nope.key_secret")
    pub = tmp_path / "public-only.key_secret"
    shutil.copy(keys["server"][0], pub)
    pub.chmod(0o600)
    with pytest.raises(KeyFileError, match="no secret-key line"):
        load_secret_key(pub)
    (keys["authorized"] / "junk.key").write_text("hello\n")
    with pytest.raises(KeyFileError, match="junk.key: no public-key line"):
        load_authorized(keys["authorized"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KeyFileError, match="no client public key"):
        load_authorized(empty)


# -- config ------------------------------------------------------------------------------------------------

def test_config_with_curve_allows_remote_binds(keys):
    cfg = validate(curve_raw(keys, control="tcp://0.0.0.0:5555", publish="tcp://0.0.0.0:5556"))
    assert cfg.curve is not None
    assert cfg.curve.public == load_secret_key(keys["server"][1])[0]
    assert set(cfg.curve.authorized) == {load_public_key(keys["alice"][0])}
    secret = load_secret_key(keys["server"][1])[1]
    assert secret.decode() not in repr(cfg) and secret.decode() not in repr(cfg.curve)


def test_config_without_curve_refuses_remote_binds():
    text = problems({"daemon": {"control": "tcp://0.0.0.0:5555"}})
    assert "daemon.control" in text and "not a loopback address" in text and "[daemon.curve]" in text
    assert validate({}).curve is None


def test_config_curve_errors_name_the_key(keys, tmp_path):
    raw = curve_raw(keys)
    raw["daemon"]["curve"]["server_secret_key"] = str(tmp_path / "missing.key_secret")
    raw["daemon"]["curve"]["authorized_clients"] = str(tmp_path / "nodir")
    text = problems(raw)
    assert "daemon.curve.server_secret_key" in text and "no such file" in text
    assert "daemon.curve.authorized_clients" in text and "no such directory" in text
    text = problems({"daemon": {"curve": {"server_secret_key": "x"}}})
    assert "daemon.curve.authorized_clients" in text and "missing" in text
    text = problems({"daemon": {"curve": {**curve_raw(keys)["daemon"]["curve"], "extra": 1}}})
    assert "daemon.curve.extra" in text
    keys["server"][1].chmod(0o644)
    secret_text = keys["server"][1].read_text()
    text = problems(curve_raw(keys))
    assert "daemon.curve.server_secret_key" in text and "group or others" in text
    assert secret_text.split('secret-key = "')[1][:40] not in text


# -- ZAP ---------------------------------------------------------------------------------------------------

def test_zap_decisions(keys):
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    try:
        zap = ZapHandler(ctx, load_authorized(keys["authorized"]), str(keys["authorized"]))
        alice = z85.decode(load_public_key(keys["alice"][0]))
        server = z85.decode(load_public_key(keys["server"][0]))
        req = [b"1.0", b"7", b"qnetd", b"127.0.0.1", b""]
        assert zap.check([*req, b"CURVE", alice])[2] == b"200"
        assert zap.check([*req, b"CURVE", server])[2] == b"400"
        assert zap.check([*req, b"NULL"])[2] == b"400"
        assert zap.check([*req, b"PLAIN", b"user", b"pw"])[2] == b"400"
        assert zap.check([b"2.0", b"7", b"qnetd", b"a", b"", b"CURVE", alice])[2] == b"500"
        assert (zap.accepted, zap.denied) == (1, 3)
        shutil.copy(keys["server"][0], keys["authorized"] / "server.key")  # SIGHUP reload
        zap.reload()
        assert zap.check([*req, b"CURVE", server])[2] == b"200"
        zap.close()
    finally:
        ctx.destroy(linger=0)


# -- client ------------------------------------------------------------------------------------------------

def test_client_needs_both_keys(keys, monkeypatch):
    monkeypatch.delenv("QNETD_SERVER_KEY", raising=False)
    monkeypatch.delenv("QNETD_CLIENT_KEY", raising=False)
    with pytest.raises(ValueError, match="both"):
        Client(curve_server_key=keys["server"][0])
    with pytest.raises(ValueError, match="both"):
        Client(curve_client_keys=keys["alice"][1])
    with pytest.raises(ValueError, match="40-character"):
        Client(curve_server_key=b"short", curve_client_keys=keys["alice"][1])
    c = Client(curve_server_key=load_public_key(keys["server"][0]), curve_client_keys=keys["alice"][1])
    assert c._curve is not None
    c.close()
    monkeypatch.setenv("QNETD_SERVER_KEY", str(keys["server"][0]))
    monkeypatch.setenv("QNETD_CLIENT_KEY", str(keys["alice"][1]))
    c = Client()
    assert c._curve == (load_public_key(keys["server"][0]), *load_secret_key(keys["alice"][1]))
    c.close()
    assert Client.__init__.__kwdefaults__["curve_server_key"] is None
