"""The daemon's key service: ``[qkd]`` config, one :class:`~daemon.qkd.link.KeyLink` per link, key delivery.

* Sifting runs in the acquisition's analysis thread (``Acquisition.consumers``); each completed block goes to
  the link's own key thread (a :class:`~daemon.worker.Worker`), so reconciliation never delays the analysis.
  At most ``max_queued_blocks`` blocks wait per link; a block beyond that is dropped and published as aborted
  (``key pipeline behind``): the machine is too slow for the block rate, and memory stays bounded.
* Every block is published on ``qkd.<link>`` (``kind = "block"``): sifted bits, QBER per basis, leak, f, final
  key bits, secret key rate, abort stage and reason.
* Delivery ``pull`` (default): ``keys.get`` (consumes on Alice's side, oldest first) and ``keys.get_by_id``
  (consumes on Bob's side: the ETSI GS QKD 014 master/slave flow), key bytes base64 in the reply. Refused
  (``-32006``) on an endpoint without CURVE unless ``qkd.deliver_without_curve`` says otherwise.
  Delivery ``push``: each block's keys are published on ``keys.<link>`` (key IDs and one binary frame of key
  bytes) and consumed on both sides as they are published; allowed only with ``[daemon.curve]``, so only
  authorized CURVE clients can subscribe. A push with no subscriber loses those keys (never delivers twice).
* Key bytes never reach a log line: logs carry key IDs, counts and sizes.
"""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path
from typing import Annotated, Any, Callable

import numpy as np
import structlog

from daemon.api.errors import DeliveryRefused, InvalidParams, KeyUnavailable
from daemon.worker import Worker
from drivers.base import TagBatch
from drivers.params import Field, ParamError, validate_table

FIELDS: dict[str, Field] = {
    "store_dir": Field(str, "", doc="directory of the key stores (<link>.alice.sqlite, <link>.bob.sqlite); "
                                   "empty: $STATE_DIRECTORY/keys under systemd, else ~/.local/state/qnetd/keys"),
    "deliver_without_curve": Field(bool, False, doc="allow keys.get / keys.get_by_id on an endpoint without CURVE "
                                                    "(only for a simulated testbed: anyone who reaches the "
                                                    "endpoint could take keys)"),
    "links": Field(dict, {}, doc="[qkd.links.NAME]: a key pipeline for the [[analysis.links]] NAME"),
}

LINK_FIELDS: dict[str, Field] = {
    "enabled": Field(bool, True, doc="false: no key pipeline for this link"),
    "block_bits": Field(int, 100_000, min=1_000, max=4_000_000,
                        doc="Z-basis (key) bits per block; the finite-key bound needs ~1e5 or more for a key"),
    "key_size_bits": Field(int, 256, min=8, max=1_048_576, doc="bits per delivered key (a multiple of 8)"),
    "eps_sec": Field(float, 1e-10, min=1e-40, max=1e-2, doc="secrecy parameter of the finite-key bound"),
    "eps_cor": Field(float, 1e-15, min=1e-40, max=1e-2, doc="correctness: the verification tag has "
                                                           "ceil(log2(1/eps_cor)) bits"),
    "abort_qber": Field(float, 0.11, min=0.001, max=0.5,
                        doc="abort threshold: an X-basis QBER above it ends the block before reconciliation (nothing "
                            "leaked); a Z-basis QBER above it (Cascade's corrections) ends it before verification"),
    "window_ps": Field(int, 0, unit="ps", min=0, max=1_000_000,
                       doc="coincidence window for sifting; 0: the analysis window (analysis.set_window)"),
    "delivery": Field(str, "pull", choices=("pull", "push"),
                      doc="pull: keys.get / keys.get_by_id; push: published on keys.<link> (CURVE only) and "
                          "consumed as published"),
    "max_queued_blocks": Field(int, 4, min=1, max=64, doc="blocks waiting for the key thread before new ones "
                                                          "are dropped (published as aborted)"),
}

TOPICS: dict[str, dict[str, Any]] = {
    "keys.<link>": {
        "doc": "Push delivery (qkd.links.NAME.delivery = \"push\", CURVE only): the keys of one block, consumed "
               "on both sides as they are published.",
        "fields": {
            "link": {"type": "string", "doc": "the link"},
            "block_id": {"type": "string", "doc": "the block the keys came from (qkd.<link> block_id)"},
            "key_ids": {"type": "array of string", "doc": "UUIDs, one per row of the keys frame"},
            "key_size_bits": {"type": "integer", "unit": "bit", "doc": "bits per key"},
        },
        "frames": [{"name": "keys", "dtype": "uint8", "shape": ["keys", "key_size_bits / 8"],
                    "doc": "key bytes, one row per key ID, bits most significant first"}],
    },
}

BLOCK_FIELDS: dict[str, dict[str, Any]] = {
    "kind": {"type": "string", "doc": "\"block\" for these per-key-block messages (\"interval\": link statistics)"},
    "block_id": {"type": "string", "doc": "UUID of the block"},
    "t_begin_ps": {"type": "integer", "unit": "ps", "doc": "tagger time of the block's first batch"},
    "t_end_ps": {"type": "integer", "unit": "ps", "doc": "tagger time at which the block was complete"},
    "duration_s": {"type": "number", "unit": "s", "doc": "t_end_ps - t_begin_ps"},
    "sifted_bits": {"type": "integer", "unit": "bit", "doc": "sifted bits of the block (Z key bits + X bits)"},
    "key_bits_in": {"type": "integer", "unit": "bit", "doc": "Z-basis bits reconciled (n)"},
    "estimation_bits": {"type": "integer", "unit": "bit", "doc": "X-basis bits disclosed for estimation (k)"},
    "qber_z": {"type": "number or null", "doc": "Z errors / n (Cascade's corrections)"},
    "qber_x": {"type": "number or null", "doc": "X errors / k"},
    "leak_ec": {"type": "integer", "unit": "bit", "doc": "parities and tag Alice disclosed (counted on the wire)"},
    "efficiency": {"type": "number or null", "doc": "f = leak_ec / (n h(qber_z))"},
    "round_trips": {"type": "integer", "doc": "round trips of the block protocol"},
    "final_key_bits": {"type": "integer", "unit": "bit", "doc": "key bits stored (0 when aborted)"},
    "keys": {"type": "integer", "doc": "keys stored"},
    "secret_key_rate_bps": {"type": "number or null", "unit": "bit/s", "doc": "final_key_bits / duration_s"},
    "finite_key": {"type": "object or null", "doc": "every term of the TLGR 2012 bound"},
    "aborted": {"type": "boolean", "doc": "no key from this block"},
    "abort_stage": {"type": "string or null", "doc": "estimation, reconciliation, verification, amplification, "
                                                     "queue or store"},
    "abort_reason": {"type": "string or null", "doc": "why"},
}


def default_store_dir() -> Path:
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0]) / "keys"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "qnetd" / "keys"


def validate(raw: Any, errors: list[ParamError], *, links: dict[str, dict[str, Any]], curve: bool,
             path: str = "qkd") -> dict[str, Any] | None:
    """Validate ``[qkd]``; returns it with ``links`` holding the enabled, validated link tables."""
    top = validate_table(raw, FIELDS, path, errors)
    out_links: dict[str, dict[str, Any]] = {}
    for name, table in (top["links"] or {}).items():
        p = f"{path}.links.{name}"
        cfg = validate_table(table, LINK_FIELDS, p, errors)
        if name not in links:
            errors.append(ParamError(p, f"no analysis link {name!r}",
                                     "one of " + (", ".join(links) or "(no [[analysis.links]])")))
            continue
        if cfg["key_size_bits"] is not None and cfg["key_size_bits"] % 8:
            errors.append(ParamError(f"{p}.key_size_bits", f"{cfg['key_size_bits']} is not a multiple of 8",
                                     "a multiple of 8, e.g. 256"))
        if cfg["delivery"] == "push" and not curve:
            errors.append(ParamError(f"{p}.delivery", "push delivery publishes key bytes: it needs [daemon.curve]",
                                     "\"pull\", or configure [daemon.curve]"))
        if cfg["enabled"]:
            out_links[name] = cfg
    top["links"] = out_links
    return top


class KeyService:
    """Every configured key link of the daemon, its key threads, stores, topics and RPC methods."""

    def __init__(self, cfg: dict[str, Any], analysis: dict[str, Any], pipeline: Any, publisher: Any, *,
                 curve: bool, adjusting: Callable[[str], bool] | None = None) -> None:
        from daemon.qkd.link import KeyLink

        self.cfg = cfg
        self.publisher = publisher
        self.curve = curve
        self.log = structlog.get_logger("qnetd.qkd")
        self.store_dir = Path(cfg["store_dir"]).expanduser() if cfg["store_dir"] else default_store_dir()
        by_name = {lk["name"]: lk for lk in analysis.get("links", [])}
        adjusting = adjusting or (lambda _link: False)
        self.links = {name: KeyLink(name, lc, by_name[name], pipeline=pipeline,
                                    adjusting=lambda n=name: adjusting(n), log=self.log.bind(link=name))
                      for name, lc in cfg["links"].items()}
        self.workers = {name: Worker(f"keys.{name}") for name in self.links}
        self.stores: dict[str, Any] = {}
        self._queues: dict[str, asyncio.Queue] = {}
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dropped_blocks = {name: 0 for name in self.links}

    # -- life cycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open (and recover) the stores, start one block task per link."""
        from daemon.qkd.keystore import LinkKeyStores

        self._loop = asyncio.get_running_loop()
        for name, link in self.links.items():
            def open_stores(n: str = name) -> tuple[Any, int | None]:  # SQLite I/O: in the link's thread
                st = LinkKeyStores(self.store_dir, n)
                return st, st.alice.status(n).get("ready_keys")

            stores, ready = await self.workers[name].call(open_stores, 60.0)
            link.stores = stores
            self.stores[name] = stores
            self.log.info("key store open", link=name, directory=str(self.store_dir), recovered=stores.recovered,
                          ready_keys=ready)
            self._queues[name] = asyncio.Queue()
            self._tasks.append(asyncio.create_task(self._blocks(name), name=f"keys.{name}"))

    async def stop(self) -> None:
        """Finish the block in progress (its keys are committed on both sides or not at all), close stores."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for name, worker in self.workers.items():
            stores = self.stores.get(name)
            if stores is not None:
                try:
                    await worker.call(stores.close, 30.0)
                except Exception as e:  # noqa: BLE001 - closing at shutdown: report and go on
                    self.log.warning("closing the key store failed", link=name, error=str(e))
            worker.close()

    # -- analysis thread: Acquisition.consumers protocol ---------------------------------------------------
    def reset(self) -> None:
        for link in self.links.values():
            link.reset()

    def feed(self, batch: TagBatch) -> list[Any]:
        for name, link in self.links.items():
            for block in link.feed(batch):
                if self._loop is not None:
                    self._loop.call_soon_threadsafe(self._enqueue, name, block)
        return []

    # -- event loop ----------------------------------------------------------------------------------------
    def _enqueue(self, name: str, block: Any) -> None:
        q = self._queues.get(name)
        if q is None:
            return
        if q.qsize() >= self.cfg["links"][name]["max_queued_blocks"]:
            self.dropped_blocks[name] += 1
            self.log.warning("key pipeline behind: block dropped", link=name, block_id=block.block_id,
                             queued=q.qsize())
            self._publish_block(name, {"link": name, "kind": "block", "block_id": block.block_id,
                                       "t_begin_ps": block.t_begin_ps, "t_end_ps": block.t_end_ps,
                                       "sifted_bits": int(block.alice_z.size + block.alice_x.size),
                                       "final_key_bits": 0, "keys": 0, "aborted": True, "abort_stage": "queue",
                                       "abort_reason": "key pipeline behind: block dropped"})
            return
        q.put_nowait(block)

    async def _blocks(self, name: str) -> None:
        link, worker, q = self.links[name], self.workers[name], self._queues[name]
        while True:
            block = await q.get()
            try:
                fields = await worker.call(lambda b=block: link.process(b), 600.0)
            except Exception as e:  # noqa: BLE001 - a store error or a protocol bug: this block is lost, not the link
                self.log.error("key block failed", link=name, block_id=block.block_id,
                               error=f"{type(e).__name__}: {e}")
                self._publish_block(name, {"link": name, "kind": "block", "block_id": block.block_id,
                                           "final_key_bits": 0, "keys": 0, "aborted": True, "abort_stage": "store",
                                           "abort_reason": f"{type(e).__name__}: {e}"})
                continue
            keys = fields.pop("_keys")
            self.log.info("key block", link=name, block_id=fields["block_id"], aborted=fields["aborted"],
                          reason=fields["abort_reason"], qber_z=fields["qber_z"], qber_x=fields["qber_x"],
                          final_key_bits=fields["final_key_bits"], keys=fields["keys"])
            self._publish_block(name, fields)
            if keys and self.cfg["links"][name]["delivery"] == "push":
                try:
                    await self._push(name, fields, keys)
                except Exception as e:  # noqa: BLE001 - a store error: these keys stay undelivered, the link goes on
                    self.log.error("key push failed", link=name, block_id=fields["block_id"],
                                   error=f"{type(e).__name__}: {e}")

    def _publish_block(self, name: str, fields: dict[str, Any]) -> None:
        if self.publisher is not None:
            body = {k: v for k, v in fields.items() if k not in ("t_begin_ps", "t_end_ps")}  # header members
            self.publisher.publish(f"qkd.{name}", body, t_begin_ps=fields.get("t_begin_ps"),
                                   t_end_ps=fields.get("t_end_ps"))

    async def _push(self, name: str, fields: dict[str, Any], keys: list[tuple[str, bytes]]) -> None:
        """Consume on both sides, then publish (a crash in between loses these keys, never sends them twice)."""
        if not self.curve or self.publisher is None:  # validated at start-up; checked again: key bytes
            return
        ids = [k for k, _ in keys]
        stores = self.stores[name]
        await self.workers[name].call(lambda: (stores.alice.get_by_ids(ids), stores.bob.get_by_ids(ids)), 60.0)
        frame = np.frombuffer(b"".join(b for _, b in keys), np.uint8).reshape(len(keys), -1)
        self.publisher.publish(f"keys.{name}", {"link": name, "block_id": fields["block_id"], "key_ids": ids,
                                                "key_size_bits": fields["key_size_bits"]}, [("keys", frame)])
        self.log.info("keys pushed", link=name, keys=len(ids))

    def status(self) -> dict[str, Any]:
        return {name: {**link.status(), "delivery": self.cfg["links"][name]["delivery"],
                       "queued_blocks": self._queues[name].qsize() if name in self._queues else 0,
                       "dropped_blocks": self.dropped_blocks[name]}
                for name, link in self.links.items()}

    # -- RPC -----------------------------------------------------------------------------------------------
    def register(self, table: Any) -> None:
        svc = self
        names = tuple(self.links)

        def link_of(link: str | None) -> str:
            if link is None:
                if len(names) == 1:
                    return names[0]
                raise InvalidParams("link: several key links are configured: name one", {"allowed": list(names)})
            if link not in svc.links:
                raise InvalidParams(f"link: no key link {link!r}", {"allowed": list(names)})
            return link

        def deliverable() -> None:
            if not svc.curve and not svc.cfg["deliver_without_curve"]:
                raise DeliveryRefused("key delivery needs a CURVE-authenticated endpoint ([daemon.curve]); this "
                                      "endpoint authenticates nobody (qkd.deliver_without_curve = true allows it "
                                      "on a simulated testbed)")

        async def on_store(name: str, fn: Callable[[], Any]) -> Any:
            from daemon.qkd.keystore import KeyStoreError

            try:
                return await svc.workers[name].call(fn, 30.0)
            except KeyStoreError as e:
                raise KeyUnavailable(str(e)) from None

        def keys_out(name: str, keys: list[Any]) -> dict[str, Any]:
            return {"link": name, "keys": [{"key_id": k.key_id, "key": base64.b64encode(k.key).decode("ascii"),
                                            "size_bits": k.size_bits} for k in keys]}

        async def status(link: Annotated[str | None, Field(doc="a key link; null: every link")] = None) -> dict:
            """Per link: sifting counters, blocks done and aborted, the last block's figures, keys ready and
            consumed on each side, delivery mode. Never key bytes."""
            chosen = [link_of(link)] if link is not None else list(names)
            out = {}
            for name in chosen:
                st = svc.status()[name]
                stores = svc.stores.get(name)
                if stores is not None:
                    st["stores"] = await on_store(name, lambda s=stores, n=name: {
                        "alice": s.alice.status(n), "bob": s.bob.status(n), "directory": str(svc.store_dir)})
                out[name] = st
            return {"links": out}

        async def get(
            link: Annotated[str | None, Field(doc="the key link (may be omitted when only one is configured)")] = None,
            number: Annotated[int, Field(min=1, max=1024, doc="how many keys")] = 1,
            size_bits: Annotated[int | None, Field(unit="bit", doc="key size; must be the link's key_size_bits")] = None,
            side: Annotated[str, Field(choices=("alice", "bob"), doc="whose store to consume from")] = "alice",
        ) -> dict:
            """Take the oldest ``number`` keys (all or none) and consume them on ``side``; the peer application
            fetches the same keys by ID with keys.get_by_id (ETSI GS QKD 014 enc_keys / dec_keys). Key bytes
            base64, bits most significant first."""
            name = link_of(link)
            deliverable()
            want = svc.cfg["links"][name]["key_size_bits"]
            if size_bits is not None and size_bits != want:
                raise InvalidParams(f"size_bits: link {name} delivers keys of {want} bits", {"allowed": [want]})
            stores = svc.stores[name]
            keys = await on_store(name, lambda: getattr(stores, side).get(number, want, link=name))
            svc.log.info("keys delivered", link=name, side=side, key_ids=[k.key_id for k in keys])
            return keys_out(name, keys)

        async def get_by_id(
            key_ids: Annotated[list[str], Field(doc="key IDs (UUIDs) from the peer's keys.get")],
            link: Annotated[str | None, Field(doc="the key link (may be omitted when only one is configured)")] = None,
            side: Annotated[str, Field(choices=("alice", "bob"), doc="whose store to consume from")] = "bob",
        ) -> dict:
            """Take the keys with these IDs (all or none: an unknown or consumed ID fails the call) and consume
            them on ``side``."""
            name = link_of(link)
            deliverable()
            if not 1 <= len(key_ids) <= 1024:
                raise InvalidParams("key_ids: 1 to 1024 IDs")
            stores = svc.stores[name]
            keys = await on_store(name, lambda: getattr(stores, side).get_by_ids(list(key_ids)))
            svc.log.info("keys delivered", link=name, side=side, key_ids=[k.key_id for k in keys])
            return keys_out(name, keys)

        table.add("keys.status", status, group="keys")
        table.add("keys.get", get, group="keys")
        table.add("keys.get_by_id", get_by_id, group="keys")


def warm_up() -> float:
    """Compile (or load from numba's cache) the sifting, Cascade, verification and PA kernels: one small block."""
    import time

    import numpy as np

    from daemon.qkd.block import BlockParams, run_block
    from daemon.qkd.stream import StreamSifter

    t0 = time.perf_counter()
    sifter = StreamSifter((0, 1, 2, 3), (4, 5, 6, 7), 1000)
    t = np.arange(0, 8000, 1000, dtype=np.int64)
    sifter.feed(t, np.arange(8, dtype=np.uint8), 0, 10_000)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 4096, dtype=np.uint8)
    b = a ^ (rng.random(4096) < 0.02).astype(np.uint8)
    run_block(a, a.copy(), b, b.copy(), BlockParams(eps_sec=1e-3, eps_cor=1e-3, key_size_bits=8))
    return time.perf_counter() - t0
