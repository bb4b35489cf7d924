"""daemon.api.protocol: published-message encoding, dumps, endpoint checks."""

from __future__ import annotations

import enum
import json
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from daemon.api import PROTOCOL_VERSION
from daemon.api.protocol import EndpointError, Message, check_endpoint, decode_message, dumps, encode_message


def sample_arrays() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [
        ("timestamps", rng.integers(-(2**62), 2**62, 50, dtype=np.int64)),
        ("channels", rng.integers(0, 256, 50, dtype=np.uint8)),
        ("rates", rng.normal(0, 1e6, 8)),
        ("matrix", rng.integers(0, 1000, (4, 8)).astype(np.int32)),
        ("empty", np.empty(0, np.float64)),
        ("empty2d", np.empty((0, 3), np.int64)),
        ("flags", np.array([True, False, True])),
    ]


def as_bytes(frame) -> bytes:
    return bytes(frame)


# -- encode / decode -------------------------------------------------------------------------------------


def test_round_trip_is_byte_exact():
    arrays = sample_arrays()
    parts = encode_message("counts", 12, {"interval_s": 1.0}, arrays, t_begin_ps=5, t_end_ps=10)
    assert len(parts) == 2 + len(arrays)
    assert parts[0] == b"counts"
    # the frames are the raw buffers of the arrays
    for frame, (_, arr) in zip(parts[2:], arrays):
        assert as_bytes(frame) == arr.tobytes()
    msg = decode_message([as_bytes(p) for p in parts])
    assert isinstance(msg, Message)
    assert msg.topic == "counts"
    assert list(msg.arrays) == [name for name, _ in arrays]
    for name, arr in arrays:
        out = msg.arrays[name]
        assert out.dtype == arr.dtype
        assert out.shape == arr.shape
        assert out.tobytes() == arr.tobytes()
    assert msg["interval_s"] == 1.0
    assert msg["t_begin_ps"] == 5 and msg["t_end_ps"] == 10


def test_frame_dtypes_are_little_endian_strings():
    arrays = sample_arrays()
    header = json.loads(encode_message("x", 0, {}, arrays)[1])
    assert [d["name"] for d in header["frames"]] == [name for name, _ in arrays]
    for d, (_, arr) in zip(header["frames"], arrays):
        dt = np.dtype(d["dtype"])
        assert dt == arr.dtype.newbyteorder("<")
        if arr.dtype.itemsize > 1:
            assert d["dtype"].startswith("<")
        else:
            assert d["dtype"][0] in "<|"
        assert d["shape"] == list(arr.shape)


@pytest.mark.parametrize("dtype", [">i4", ">f8", ">u2", ">i8"])
def test_big_endian_input_round_trips_to_same_values(dtype):
    arr = (np.arange(-5, 15).reshape(4, 5) * 3).astype(dtype)
    parts = encode_message("x", 0, {}, [("a", arr)])
    d = json.loads(parts[1])["frames"][0]
    assert d["dtype"] == np.dtype(dtype).newbyteorder("<").str
    little = arr.astype(np.dtype(dtype).newbyteorder("<"))
    assert as_bytes(parts[2]) == little.tobytes()
    out = decode_message(parts).arrays["a"]
    np.testing.assert_array_equal(out, arr)
    assert out.dtype == np.dtype(dtype).newbyteorder("<")


def test_non_contiguous_input():
    base = np.arange(60, dtype=np.int64).reshape(6, 10)
    for arr in (base[:, ::3], base.T, np.asfortranarray(base)):
        out = decode_message(encode_message("x", 0, {}, [("a", arr)])).arrays["a"]
        np.testing.assert_array_equal(out, arr)
        assert out.shape == arr.shape


def test_header_fields():
    before = time.time()
    parts = encode_message("device.pump", 41, {"state": "ready", "attempt": np.int64(2)})
    after = time.time()
    header = json.loads(parts[1])
    assert header["version"] == PROTOCOL_VERSION
    assert header["topic"] == "device.pump"
    assert header["seq"] == 41
    assert before <= header["host_time"] <= after
    assert header["frames"] == []
    assert header["state"] == "ready" and header["attempt"] == 2
    assert "t_begin_ps" not in header and "t_end_ps" not in header
    msg = decode_message(parts)
    assert msg.arrays == {}
    assert msg["seq"] == 41


def test_t_begin_end_are_ints():
    header = json.loads(encode_message("x", 0, {}, t_begin_ps=np.int64(3), t_end_ps=np.uint64(9))[1])
    assert header["t_begin_ps"] == 3 and header["t_end_ps"] == 9


@pytest.mark.parametrize("key", ["version", "topic", "seq", "host_time", "frames"])
def test_field_clashing_with_header_refused(key):
    with pytest.raises(ValueError, match=key):
        encode_message("x", 0, {key: 1})


def test_decode_rejects_frame_count_mismatch():
    parts = [as_bytes(p) for p in encode_message("x", 0, {}, [("a", np.arange(3)), ("b", np.arange(2))])]
    with pytest.raises(ValueError, match="frames"):
        decode_message(parts[:-1])
    with pytest.raises(ValueError, match="frames"):
        decode_message(parts + [b"extra"])


def test_decode_rejects_short_message():
    with pytest.raises(ValueError):
        decode_message([b"x"])
    with pytest.raises(ValueError):
        decode_message([])


def test_decode_rejects_bad_header_json_and_bad_buffer():
    with pytest.raises(ValueError):
        decode_message([b"x", b"{not json"])
    parts = [as_bytes(p) for p in encode_message("x", 0, {}, [("a", np.arange(4, dtype=np.int64))])]
    with pytest.raises(ValueError):
        decode_message(parts[:2] + [parts[2][:-3]])  # not a whole number of items
    with pytest.raises(ValueError):
        decode_message(parts[:2] + [parts[2][:-8]])  # 3 items for shape [4]


def test_decode_rejects_non_object_header_with_value_error():
    with pytest.raises(ValueError):
        decode_message([b"x", b"[1, 2]"])


@settings(max_examples=50, deadline=None)
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from([np.dtype(t) for t in ("<i8", ">i8", "<u1", "<f8", ">f4", "<i2", ">u4", "?")]),
        shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5),
    )
)
def test_round_trip_property(arr):
    out = decode_message(encode_message("p", 0, {}, [("a", arr)])).arrays["a"]
    assert out.shape == arr.shape
    assert out.dtype == arr.dtype.newbyteorder("<") or (arr.dtype.itemsize == 1 and out.dtype == arr.dtype)
    np.testing.assert_array_equal(out, arr)


# -- dumps -----------------------------------------------------------------------------------------------


class Colour(str, enum.Enum):
    RED = "red"


def test_dumps_converts_numpy_and_friends():
    obj = {
        "i": np.int64(3),
        "u": np.uint8(200),
        "f": np.float32(1.5),
        "b": np.bool_(True),
        "arr": np.arange(3),
        "t": (1, 2),
        "e": Colour.RED,
    }
    out = json.loads(dumps(obj))
    assert out == {"i": 3, "u": 200, "f": 1.5, "b": True, "arr": [0, 1, 2], "t": [1, 2], "e": "red"}
    assert isinstance(out["b"], bool)


def test_dumps_is_compact_utf8():
    data = dumps({"a": [1, 2], "s": "µs"})
    assert isinstance(data, bytes)
    assert b" " not in data
    assert json.loads(data.decode("utf-8")) == {"a": [1, 2], "s": "µs"}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), np.float64("nan"), np.float32("inf")])
def test_dumps_refuses_nan_and_inf(bad):
    with pytest.raises(ValueError):
        dumps({"x": bad})


def test_dumps_refuses_unknown_objects():
    with pytest.raises(TypeError, match="object"):
        dumps({"x": object()})


# -- check_endpoint --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://127.0.0.1:5555",
        "tcp://127.0.0.1:1",
        "tcp://127.0.0.1:65535",
        "tcp://127.1.2.3:5555",
        "tcp://[::1]:5555",
        "tcp://localhost:5555",
        "tcp://LOCALHOST:5555",
        "ipc:///run/qnetd/control.sock",
        "ipc://@abstract",
        "inproc://control",
    ],
)
def test_loopback_and_local_endpoints_accepted(endpoint):
    assert check_endpoint(endpoint) == endpoint


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://0.0.0.0:5555",
        "tcp://192.168.1.5:5555",
        "tcp://10.0.0.1:5555",
        "tcp://*:5555",
        "tcp://[::]:5555",
        "tcp://[2001:db8::1]:5555",
        "tcp://eth0:5555",
        "tcp://example.org:5555",
        "tcp://localhost.example.org:5555",
    ],
)
def test_remote_endpoints_rejected(endpoint):
    with pytest.raises(EndpointError, match="loopback"):
        check_endpoint(endpoint)
    # they are fine with authentication
    assert check_endpoint(endpoint, allow_remote=True) == endpoint


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://127.0.0.1", "tcp://127.0.0.1:", "tcp://127.0.0.1:0", "tcp://127.0.0.1:65536", "tcp://127.0.0.1:*",
     "tcp://localhost", "tcp://[::1]", "tcp://:5555"],
)
def test_missing_or_bad_port_rejected(endpoint):
    with pytest.raises(EndpointError, match="port"):
        check_endpoint(endpoint)
    with pytest.raises(EndpointError):
        check_endpoint(endpoint, allow_remote=True)


@pytest.mark.parametrize("endpoint", ["127.0.0.1:5555", "", "udp://127.0.0.1:5555", "pgm://127.0.0.1:5555",
                                      "ipc://", "inproc://", 5555, None])
def test_malformed_endpoints_rejected(endpoint):
    with pytest.raises(EndpointError):
        check_endpoint(endpoint)


def test_endpoint_error_is_value_error():
    assert issubclass(EndpointError, ValueError)
