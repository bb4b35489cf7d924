"""CURVE authentication: key files, ``qnetd keygen`` and the ZAP handler.

Key files use the format of ``zmq.auth.create_certificates`` (ZPL-style text with ``public-key = "..."`` and,
in the secret file, ``secret-key = "..."``, both Z85): ``NAME.key`` holds the public key, ``NAME.key_secret``
the pair. Nothing here ever puts key material into an error message or a log line: errors name the file
and what is wrong with it, nothing else. Public keys may be logged as a short fingerprint.

A secret key file readable by group or others is refused (as ssh refuses such a private key): whoever can
read it can impersonate the daemon or the client.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import zmq
import zmq.asyncio
from zmq.utils import z85

log = structlog.get_logger("qnetd.security")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = "qnetd"
_KEY_LINE = re.compile(r'^\s*(public-key|secret-key)\s*=\s*"?([^"\s]*)"?\s*$')


class KeyFileError(ValueError):
    """A key file is missing, unreadable, malformed or too widely readable (the message names the file)."""


def fingerprint(public_z85: bytes) -> str:
    """A short, non-secret label of a public key for logs: its first 8 Z85 characters."""
    return public_z85[:8].decode("ascii", "replace")


def _parse(path: Path) -> dict[str, bytes]:
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise KeyFileError(f"{path}: is a directory, not a key file") from None
    except PermissionError:
        raise KeyFileError(f"{path}: not readable by this user") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read: {e.strerror or type(e).__name__}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not a CURVE key file (not ASCII text)") from None
    keys: dict[str, bytes] = {}
    for line in text.splitlines():
        m = _KEY_LINE.match(line)
        if m:
            keys[m.group(1)] = m.group(2).encode("ascii")
    for name, value in keys.items():
        if not _valid_z85_key(value):
            raise KeyFileError(f"{path}: the {name} is not a 40-character Z85 CURVE key")
    return keys


def _valid_z85_key(value: bytes) -> bool:
    if len(value) != 40:
        return False
    try:
        return len(z85.decode(value)) == 32
    except (ValueError, KeyError, TypeError):
        return False


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The Z85 public key of a ``.key`` (or ``.key_secret``) file."""
    p = Path(path)
    keys = _parse(p)
    if "public-key" not in keys:
        raise KeyFileError(f"{p}: no public-key line (expected a file written by `qnetd keygen`)")
    return keys["public-key"]


def load_secret_key(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of a ``.key_secret`` file; refuses a file that group or others can read."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"{p}: no such file") from None
    except OSError as e:
        raise KeyFileError(f"{p}: cannot stat: {e.strerror or type(e).__name__}") from None
    if stat.S_ISREG(mode) and mode & 0o077:
        raise KeyFileError(f"{p}: secret key file is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
                           f"run `chmod 600 {p}`")
    keys = _parse(p)
    if "secret-key" not in keys:
        raise KeyFileError(f"{p}: no secret-key line (is this the public .key file? the secret one ends in .key_secret)")
    secret = keys["secret-key"]
    public = zmq.curve_public(secret)
    if "public-key" in keys and keys["public-key"] != public:
        raise KeyFileError(f"{p}: the public-key line does not belong to the secret key")
    return public, secret


def load_authorized(directory: str | os.PathLike[str]) -> dict[bytes, str]:
    """Every ``*.key`` public key in ``directory``: {public key: file name}. Raises KeyFileError."""
    d = Path(directory)
    if not d.is_dir():
        raise KeyFileError(f"{d}: not a directory" if d.exists() else f"{d}: no such directory")
    try:
        files = sorted(f for f in d.iterdir() if f.name.endswith(".key") and not f.name.startswith("."))
    except OSError as e:
        raise KeyFileError(f"{d}: cannot list: {e.strerror or type(e).__name__}") from None
    keys: dict[bytes, str] = {}
    for f in files:
        keys[load_public_key(f)] = f.name
    if not keys:
        raise KeyFileError(f"{d}: contains no client public key (*.key) files")
    return keys


def keygen(out_dir: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write NAME.key (public, 0644) and NAME.key_secret (0600, created exclusively); refuse to overwrite."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise ValueError(f"invalid key name {name!r}: letters, digits, '_', '-', '.', not starting with '.'")
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    pub_path, sec_path = d / f"{name}.key", d / f"{name}.key_secret"
    for p in (pub_path, sec_path):
        if p.exists() or p.is_symlink():
            raise FileExistsError(f"{p} exists: refusing to overwrite a key (remove it first, or choose --name)")
    public, secret = zmq.curve_keypair()
    now = datetime.datetime.now().isoformat(timespec="seconds")
    head = f"#   ****  Generated on {now} by qnetd keygen  ****\n"
    pub_text = (head + "#   ZeroMQ CURVE Public Certificate\n#   Exchange securely, or use a secure mechanism to "
                "verify the contents\n#   of this file after exchange. Store public certificates in your home\n"
                "#   directory, in the .curve subdirectory.\n\nmetadata\ncurve\n"
                f'    public-key = "{public.decode()}"\n')
    sec_text = (head + "#   ZeroMQ CURVE **Secret** Certificate\n#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change "
                "its permissions.\n\nmetadata\ncurve\n"
                f'    public-key = "{public.decode()}"\n    secret-key = "{secret.decode()}"\n')
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(sec_path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, sec_text.encode())
    finally:
        os.close(fd)
    try:
        fd = os.open(pub_path, flags, 0o644)
        try:
            os.write(fd, pub_text.encode())
        finally:
            os.close(fd)
    except BaseException:
        sec_path.unlink(missing_ok=True)
        raise
    return pub_path, sec_path


@dataclass(frozen=True)
class CurveConfig:
    """Validated ``[daemon.curve]``. The secret key is kept out of repr (a Config may be printed)."""

    server_secret_key: str
    authorized_clients: str
    public: bytes
    secret: bytes = field(repr=False)
    authorized: dict[bytes, str] = field(repr=False, default_factory=dict)


def make_server(sock: zmq.Socket, curve: CurveConfig) -> None:
    """Turn ``sock`` (not yet bound) into a CURVE server checked by the ZAP handler."""
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    sock.curve_secretkey = curve.secret
    sock.curve_publickey = curve.public
    sock.curve_server = True


class ZapHandler:
    """A ZAP (RFC 27) handler on the daemon's context, served by a task on the event loop.

    Accepts a CURVE client only if its public key is in the authorized set; everything else (another
    mechanism, an unknown key) is denied with 400. It must be started before any CURVE socket binds:
    without a ZAP handler libzmq accepts every CURVE client.
    """

    def __init__(self, ctx: zmq.asyncio.Context, authorized: dict[bytes, str], directory: str = "") -> None:
        self.authorized = dict(authorized)
        self.directory = directory
        self.accepted = 0
        self.denied = 0
        self.socket = ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)

    def reload(self) -> None:
        """Reread the authorized-clients directory (SIGHUP); on an error keep the current set."""
        try:
            keys = load_authorized(self.directory)
        except KeyFileError as e:
            log.error("authorized clients not reloaded, keeping the previous set", error=str(e))
            return
        self.authorized = keys
        log.info("authorized clients reloaded", directory=self.directory, clients=len(keys))

    def check(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:
            return [b"1.0", frames[1] if len(frames) > 1 else b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        creds = frames[6:]
        if version != b"1.0":
            return [b"1.0", request_id, b"500", b"unsupported ZAP version", b"", b""]
        addr = address.decode("utf-8", "replace")
        if mechanism == b"CURVE" and len(creds) == 1 and len(creds[0]) == 32:
            key = z85.encode(creds[0])
            name = self.authorized.get(key)
            if name is not None:
                self.accepted += 1
                log.debug("CURVE client accepted", client=name, address=addr)
                return [b"1.0", request_id, b"200", b"OK", name.encode(), b""]
            self.denied += 1
            log.warning("CURVE client denied: key not authorized", key=fingerprint(key), address=addr)
        else:
            self.denied += 1
            log.warning("client denied: not CURVE", mechanism=mechanism.decode("ascii", "replace"), address=addr)
        return [b"1.0", request_id, b"400", b"not authorized", b"", b""]

    async def serve(self) -> None:
        while True:
            frames = await self.socket.recv_multipart()
            try:
                reply = self.check(frames)
            except Exception:  # noqa: BLE001 - a REP must answer, or it is stuck
                log.exception("ZAP request failed")
                reply = [b"1.0", frames[1] if len(frames) > 1 else b"", b"500", b"internal error", b"", b""]
            await self.socket.send_multipart(reply)

    def close(self) -> None:
        self.socket.close(linger=0)
