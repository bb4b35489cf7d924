"""``qnetctl``: script and inspect a running qnetd from the shell.

    qnetctl describe                         every method, topic and device
    qnetctl status                           daemon and device states
    qnetctl call pump.set_current milliamps=40
    qnetctl watch counts --count 3           published messages as JSON lines

Values in ``key=value`` are read as JSON when they parse (40, true, [1,2], "text"), else as plain strings.
Exit status: 0 ok, 1 usage, 2 the daemon answered with an error, 3 no daemon answering.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import zmq

from daemon.api.errors import RpcError
from daemon.client import DEFAULT_CONTROL, DEFAULT_PUBLISH, Client, NoReply

EXIT_OK, EXIT_USAGE, EXIT_REMOTE, EXIT_NO_DAEMON = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 by default; 2 means "remote error" here
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qnetctl", description="Control a running qnetd over ZeroMQ.",
                epilog="exit status: 0 ok, 1 usage, 2 remote error, 3 no daemon answering")
    p.add_argument("--control", default=None, metavar="EP", help=f"control endpoint (default $QNETD_CONTROL or {DEFAULT_CONTROL})")
    p.add_argument("--publish", default=None, metavar="EP", help=f"publish endpoint (default $QNETD_PUBLISH or {DEFAULT_PUBLISH})")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for an answer (default 10)")
    p.add_argument("--server-key", default=None, metavar="FILE",
                   help="CURVE: the daemon's public key file (default $QNETD_SERVER_KEY; needs --client-key)")
    p.add_argument("--client-key", default=None, metavar="FILE",
                   help="CURVE: this client's secret key file, NAME.key_secret (default $QNETD_CLIENT_KEY)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    sub.add_parser("describe", help="print every method, topic and device")
    sub.add_parser("status", help="print daemon and device status")
    call = sub.add_parser("call", help="call METHOD with key=value parameters")
    call.add_argument("method")
    call.add_argument("params", nargs="*", metavar="key=value")
    watch = sub.add_parser("watch", help="print messages of TOPIC (exact, or prefix*) as JSON lines")
    watch.add_argument("topic", nargs="?", default="", help="topic; empty: all")
    watch.add_argument("--count", type=int, default=None, metavar="N", help="stop after N messages")
    return p


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_params(items: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"parameter {item!r} is not key=value")
        try:
            params[key] = json.loads(value, parse_constant=_no_constant)
        except ValueError:
            params[key] = value  # not JSON (or NaN/Infinity, which JSON-RPC cannot carry): a plain string
    return params


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        params = parse_params(args.params) if args.command == "call" else {}
    except ValueError as e:
        print(f"qnetctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        client = Client(args.control, args.publish, timeout=args.timeout,
                        curve_server_key=args.server_key, curve_client_keys=args.client_key)
    except ValueError as e:  # includes KeyFileError: names the file, never its contents
        print(f"qnetctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "describe":
            _print(client.describe())
        elif args.command == "status":
            _print(client.status())
        elif args.command == "call":
            _print(client.call_with(args.method, params))
        elif args.command == "watch":
            topics = (args.topic,) if args.topic else ()
            # a health message arrives at least every daemon.health_interval_s; without --count, wait forever
            for msg in client.subscribe(*topics, count=args.count, timeout=args.timeout if args.count else None):
                arrays = {k: v.tolist() for k, v in msg.arrays.items()}
                print(json.dumps({"topic": msg.topic, **msg.header, **({"arrays": arrays} if arrays else {})}), flush=True)
    except NoReply as e:
        print(f"qnetctl: {e}", file=sys.stderr)
        return EXIT_NO_DAEMON
    except RpcError as e:
        print(f"qnetctl: error {e.code}: {e.message}", file=sys.stderr)
        if e.data is not None:
            print(f"qnetctl: data: {json.dumps(e.data)}", file=sys.stderr)
        return EXIT_REMOTE
    except zmq.ZMQError as e:  # e.g. a malformed --control endpoint
        print(f"qnetctl: {e} (control {client.control}, publish {client.publish})", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `qnetctl watch ... | head`: the reader went away
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        client.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
