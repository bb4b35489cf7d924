"""[qkd] config validation and the link's block cutting (sifting -> blocks) without a daemon."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from daemon.config import ConfigError, default_config_text, parse, validate
from daemon.qkd.link import KeyLink
from daemon.qkd.service import LINK_FIELDS, default_store_dir
from drivers.base import TagBatch, TagFlags


def config_with(qkd_tail: str) -> str:
    text = default_config_text()
    start = text.index("[qkd]")
    return text[:start] + qkd_tail


def test_embedded_default_has_a_key_link():
    cfg = validate(parse(default_config_text()))
    assert cfg.qkd is not None and list(cfg.qkd["links"]) == ["bbm92"]
    assert cfg.qkd["links"]["bbm92"]["delivery"] == "pull" and cfg.qkd["deliver_without_curve"] is True


def test_errors_name_the_key():
    text = config_with('[qkd]\nstore_dir = 5\n[qkd.links.nolink]\nblock_bits = 10\n'
                       '[qkd.links.bbm92]\nkey_size_bits = 100\ndelivery = "push"\nbogus = 1\n')
    with pytest.raises(ConfigError) as e:
        validate(parse(text))
    msg = str(e.value)
    for key in ("qkd.store_dir", "qkd.links.nolink", "qkd.links.bbm92.key_size_bits", "qkd.links.bbm92.delivery",
                "qkd.links.bbm92.bogus"):
        assert key in msg, (key, msg)
    assert "needs [daemon.curve]" in msg and "multiple of 8" in msg


def test_store_dir_default(monkeypatch, tmp_path):
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    assert default_store_dir() == tmp_path / "state" / "keys"
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_store_dir() == tmp_path / "xdg" / "qnetd" / "keys"


class _Pipe:
    def window_and_delays(self) -> tuple[int, dict[int, int]]:
        return 1000, {}


def _batches(rng, n_batches: int, pairs_per_batch: int, span: int = 10**9):
    """Perfectly correlated phi+ pairs: Alice channel c, Bob channel c + 4, 100 ps apart."""
    out = []
    for k in range(n_batches):
        t = np.sort(rng.choice(np.arange(k * span, (k + 1) * span - 10_000, 5_000), pairs_per_batch, replace=False))
        c = rng.integers(0, 4, pairs_per_batch)
        ts = np.empty(2 * t.size, np.int64)
        ch = np.empty(2 * t.size, np.uint8)
        ts[0::2], ts[1::2] = t, t + 100
        ch[0::2], ch[1::2] = c, c + 4
        out.append(TagBatch(ts, ch, k * span, (k + 1) * span))
    return out


def make_link(block_bits: int, adjusting=lambda: False) -> KeyLink:
    cfg = {k: f.default for k, f in LINK_FIELDS.items()}
    cfg["block_bits"] = block_bits
    link = {"name": "bbm92", "alice": [0, 1, 2, 3], "bob": [4, 5, 6, 7], "bell_state": "phi+"}
    return KeyLink("bbm92", cfg, link, pipeline=_Pipe(), adjusting=adjusting)


def test_blocks_are_cut_at_block_bits_and_keep_every_bit():
    rng = np.random.default_rng(1)
    kl = make_link(1000)
    blocks = [b for batch in _batches(rng, 6, 900) for b in kl.feed(batch)]
    z_total = kl.sifter.counters.sifted_z
    assert len(blocks) == z_total // 1000 and all(b.alice_z.size == 1000 for b in blocks)
    assert kl.status()["block_fill_bits"] == z_total - 1000 * len(blocks)
    for b in blocks:  # no errors in this stream
        assert np.array_equal(b.alice_z, b.bob_z) and np.array_equal(b.alice_x, b.bob_x)
    assert sum(b.alice_x.size for b in blocks) <= kl.sifter.counters.sifted_x


def test_bits_are_dropped_while_adjusting_and_one_batch_after():
    rng = np.random.default_rng(2)
    flags = iter([False, True, True, False, False, False])
    kl = make_link(10**6, adjusting=lambda: next(flags))
    sifted = []
    for batch in _batches(rng, 6, 500):
        before = kl.sifter.counters.sifted_z + kl.sifter.counters.sifted_x
        kl.feed(batch)
        sifted.append(kl.sifter.counters.sifted_z + kl.sifter.counters.sifted_x - before)
    # batches 1, 2 (adjusting) and 3 (the guard batch after) are dropped
    assert kl.discarded_adjusting_bits == sum(sifted[1:4])
    assert kl.status()["block_fill_bits"] == kl._acc.z
    assert kl._acc.z + kl._acc.x == sifted[0] + sum(sifted[4:])


def test_overflow_batch_is_not_sifted():
    rng = np.random.default_rng(3)
    kl = make_link(10**6)
    b = _batches(rng, 1, 500)[0]
    bad = TagBatch(b.timestamps, b.channels, b.t_begin, b.t_end, TagFlags.OVERFLOW)
    kl.feed(bad)
    assert kl.sifter.counters.coincidences == 0 and kl.sifter.counters.broken_batches == 1


# -- the RPC methods on a KeyService with two links (no daemon) ---------------------------------------------------
def _service(tmp_path, *, curve: bool, deliver_without_curve: bool = False):
    import asyncio  # noqa: F401 - used by the callers

    from daemon.api.methods import MethodTable
    from daemon.qkd.service import KeyService

    lk = {"alice": [0, 1, 2, 3], "bob": [4, 5, 6, 7], "bell_state": "phi+"}
    analysis = {"links": [{"name": "a", **lk}, {"name": "b", **lk}]}
    cfg = {"store_dir": str(tmp_path / "keys"), "deliver_without_curve": deliver_without_curve,
           "links": {n: {**{k: f.default for k, f in LINK_FIELDS.items()}, "block_bits": 20_000}
                     for n in ("a", "b")}}
    svc = KeyService(cfg, analysis, _Pipe(), None, curve=curve)
    table = MethodTable()
    svc.register(table)
    return svc, table


def _fill(svc, name: str) -> int:
    """Run one block of correlated bits through the link (protocol + both stores); returns the keys stored."""
    from daemon.qkd.link import Block

    rng = np.random.default_rng(11)
    z = rng.integers(0, 2, 20_000, dtype=np.uint8)
    x = rng.integers(0, 2, 20_000, dtype=np.uint8)
    bz = z ^ (rng.random(z.size) < 0.01).astype(np.uint8)
    bx = x ^ (rng.random(x.size) < 0.01).astype(np.uint8)
    fields = svc.links[name].process(Block("blk", z, bz, x, bx, 0, 10**12, 80_000))
    assert not fields["aborted"], fields["abort_reason"]
    return fields["keys"]


def test_rpc_link_choice_delivery_and_consumption(tmp_path):
    import asyncio

    from daemon.api import errors

    async def run() -> None:
        svc, table = _service(tmp_path, curve=True)
        await svc.start()
        try:
            n = await asyncio.to_thread(_fill, svc, "a")
            assert n > 2
            with pytest.raises(errors.InvalidParams, match="several key links"):
                await table.call("keys.get", {})
            with pytest.raises(errors.InvalidParams, match="no key link"):
                await table.call("keys.get", {"link": "zz"})
            with pytest.raises(errors.InvalidParams, match="256 bits"):
                await table.call("keys.get", {"link": "a", "size_bits": 128})
            with pytest.raises(errors.KeyUnavailable):  # link b has no keys: nothing consumed anywhere
                await table.call("keys.get", {"link": "b"})
            got = await table.call("keys.get", {"link": "a", "number": 2})
            ids = [k["key_id"] for k in got["keys"]]
            with pytest.raises(errors.KeyUnavailable):  # all or none: one ID consumed on Alice's side already
                await table.call("keys.get_by_id", {"link": "a", "key_ids": ids + ["not-a-uuid"]})
            bob = await table.call("keys.get_by_id", {"link": "a", "key_ids": ids})
            assert [k["key"] for k in bob["keys"]] == [k["key"] for k in got["keys"]]
            with pytest.raises(errors.KeyUnavailable):
                await table.call("keys.get", {"link": "a", "number": n})  # only n - 2 left on Alice's side
            st = (await table.call("keys.status", {"link": "a"}))["links"]["a"]
            assert st["stores"]["alice"]["ready_keys"] == n - 2 and st["stores"]["bob"]["ready_keys"] == n - 2
            text = str(st)
            assert all(k["key"] not in text and base64.b64decode(k["key"]).hex() not in text for k in got["keys"])
        finally:
            await svc.stop()

    asyncio.run(run())


def test_rpc_refuses_delivery_without_curve(tmp_path):
    import asyncio

    from daemon.api import errors

    async def run() -> None:
        svc, table = _service(tmp_path, curve=False)
        await svc.start()
        try:
            with pytest.raises(errors.DeliveryRefused):
                await table.call("keys.get", {"link": "a"})
            with pytest.raises(errors.DeliveryRefused):
                await table.call("keys.get_by_id", {"link": "a", "key_ids": ["0c5b5c1e-3f7e-4d0a-9d0e-7f0f4b1c2a11"]})
            assert set((await table.call("keys.status", {}))["links"]) == {"a", "b"}
        finally:
            await svc.stop()

    asyncio.run(run())
