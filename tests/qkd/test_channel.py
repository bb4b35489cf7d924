"""Channel: wire format round trip, leak counted from the disclosed bits actually sent, round trips."""

import numpy as np
import pytest

from daemon.qkd.channel import Message, decode, encode, loopback_pair, pump


def test_roundtrip_preserves_everything():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2, 77, dtype=np.uint8)
    msg = Message("x.y", {"a": 1, "s": "t"}, {"p": np.arange(5, dtype=np.uint16), "w": np.array([2**63], np.uint64)},
                  disclosed=bits)
    out = decode(encode(msg))
    assert out.kind == "x.y" and out.meta == {"a": 1, "s": "t"}
    assert out.arrays["p"].dtype == np.uint16 and list(out.arrays["p"]) == [0, 1, 2, 3, 4]
    assert out.arrays["w"][0] == 2**63
    assert np.array_equal(out.disclosed, bits)
    assert len(encode(msg)) < 200  # 77 bits travel packed (10 bytes)


def test_decoded_arrays_are_copies():
    arr = np.arange(4, dtype=np.int64)
    out = decode(encode(Message("k", arrays={"a": arr})))
    arr[0] = 99
    assert out.arrays["a"][0] == 0


def test_rejects_non_bits_and_truncation():
    with pytest.raises(ValueError):
        encode(Message("k", disclosed=np.array([0, 2], np.uint8)))
    with pytest.raises(ValueError):
        decode(encode(Message("k", disclosed=np.ones(9, np.uint8)))[:-1])


def test_loopback_counts_leak_bytes_messages_turns():
    a, b = loopback_pair()
    a.send(Message("one", disclosed=np.ones(13, np.uint8)))
    a.send(Message("two", disclosed=np.zeros(3, np.uint8)))
    assert b.pending() == 2
    assert b.recv().kind == "one" and b.recv().nbits == 3
    b.send(Message("reply", {"ok": True}))
    a.recv()
    assert a.sent.leak_bits == 16 and a.sent.messages == 2
    assert b.sent.leak_bits == 0 and b.sent.messages == 1 and b.sent.bytes > 0
    assert a.round_trips == 1
    with pytest.raises(LookupError):
        a.recv()


class _Counter:
    """A toy party: Alice sends k, Bob answers k-1 until 0."""

    def __init__(self, first):
        self.first = first
        self.done = False

    def start(self):
        return Message("n", {"k": self.first}) if self.first is not None else None

    def on_message(self, msg):
        k = msg.meta["k"]
        if k <= 1:
            self.done = True
        if k == 0:
            return None
        self.done = k <= 1
        return Message("n", {"k": k - 1})


def test_pump_runs_to_completion():
    a, b = loopback_pair()
    pa, pb = _Counter(5), _Counter(None)
    pump(pa, pb, a, b)
    assert a.sent.messages + b.sent.messages == 6
    assert a.round_trips == 3


def test_garbage_raises_value_error():
    rng = np.random.default_rng(3)
    good = encode(Message("k", {"a": 1}, {"p": np.arange(3, dtype=np.uint32)}, disclosed=np.ones(5, np.uint8)))
    cases = [b"", b"\x05\x00\x00\x00{}", b"\xff\xff\xff\x7f", good[:10], good + b"x",
             b"\x02\x00\x00\x00[]", b"\x0b\x00\x00\x00not json!!"]
    for _ in range(200):
        cases.append(bytes(rng.integers(0, 256, int(rng.integers(0, 60)), dtype=np.uint8)))
        k = int(rng.integers(4, len(good)))
        cases.append(good[:k] + bytes([int(rng.integers(0, 256))]) + good[k + 1:])
    for data in cases:
        try:
            decode(data)
        except ValueError:
            pass
