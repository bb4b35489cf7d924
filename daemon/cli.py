"""``qnetd``: run the daemon, check a config, list drivers, make CURVE keys.

Exit status: 0 clean stop, 1 unexpected error, 2 usage, 69 an endpoint could not be bound, 78 config error,
130 interrupted (Ctrl-C) before the daemon had installed its signal handlers.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import signal
import sys

from daemon import __version__
from daemon.config import DEFAULT_SOURCE, EX_CONFIG, ConfigError, load


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qnetd", description="qnetd: control daemon for quantum-network testbeds")
    p.add_argument("--version", action="version", version=f"qnetd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", metavar="FILE", help=f"TOML config (default: {DEFAULT_SOURCE}, the simulated testbed)")
    run.add_argument("--control", metavar="ENDPOINT", help="override daemon.control (JSON-RPC ROUTER)")
    run.add_argument("--publish", metavar="ENDPOINT", help="override daemon.publish (PUB)")
    run.add_argument("--log-format", choices=("auto", "console", "json"), help="override daemon.log_format")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="override daemon.log_level")

    check = sub.add_parser("check", help="validate a config and exit (78 if it has problems)")
    check.add_argument("--config", metavar="FILE", help=f"TOML config (default: {DEFAULT_SOURCE})")

    keygen = sub.add_parser("keygen", help="write a CURVE key pair: NAME.key (public) and NAME.key_secret (mode 0600)")
    keygen.add_argument("--out", metavar="DIR", default=".", help="directory to write to (default: the current one)")
    keygen.add_argument("--name", metavar="NAME", default="qnetd", help="file name stem (default: qnetd)")

    sub.add_parser("drivers", help="list the installed drivers (entry-point group qnetd.drivers)")
    sub.add_parser("default-config", help="print the embedded default config (the simulated testbed)")
    return p


def _report(err: ConfigError) -> int:
    print(f"qnetd: {err.source}: {len(err.errors)} config problem(s):", file=sys.stderr)
    for e in err.errors:
        print(f"  {e}", file=sys.stderr)
    return EX_CONFIG


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keygen":
        from daemon.api.security import keygen

        try:
            public, secret = keygen(args.out, args.name)
        except (OSError, ValueError) as e:
            print(f"qnetd keygen: {e}", file=sys.stderr)
            return 1
        print(f"public key: {public}\nsecret key: {secret} (mode 0600: keep it private)")
        return 0
    if args.command == "drivers":
        from drivers import registry

        for name, target in sorted(registry.available().items()):
            print(f"{name:28s} {target}")
        return 0
    if args.command == "default-config":
        from daemon.config import default_config_text

        sys.stdout.write(default_config_text())
        return 0
    overrides = {}
    if args.command == "run":
        overrides = {"daemon": {k: v for k, v in (("control", args.control), ("publish", args.publish),
                                                  ("log_format", args.log_format), ("log_level", args.log_level))
                                if v is not None}}
    try:
        cfg = load(args.config, overrides)
    except ConfigError as e:
        return _report(e)
    if args.command == "check":
        devices = ", ".join(f"{n} ({d.driver}{'' if d.enabled else ', disabled'})"
                            for n, d in cfg.devices.items()) or "none"
        print(f"{cfg.source}: ok; devices: {devices}")
        return 0

    from daemon import logs
    from daemon.app import Daemon

    logs.configure(cfg.daemon["log_format"], cfg.daemon["log_level"])
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack to stderr
    try:
        return asyncio.run(Daemon(cfg).run())
    except KeyboardInterrupt:  # a second Ctrl-C before the handlers were installed
        return 130


if __name__ == "__main__":
    sys.exit(main())
