"""drivers.apt: APT message encoding, payload layouts and the resynchronizing frame reader.

Expected bytes are written out by hand from the layouts in protocols.md 2.1 (little-endian; short header
``<HBBBB`` = id, param1, param2, dest, source; long header ``<HHBB`` = id, length, dest | 0x80, source).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers import apt
from drivers.apt import DEVICE, HOST, FrameReader, Message, MsgId

# -- exact bytes ------------------------------------------------------------------------------------------


def test_move_absolute_45_deg_on_second_paddle() -> None:
    # 45 deg * 1370/170 = 362.65 -> 363 = 0x016B; paddle index 1 = channel 2 = ident 0x02
    counts = apt.degrees_to_counts(45.0)
    assert counts == 363
    msg = Message.long(MsgId.MOT_MOVE_ABSOLUTE, apt.pack_chan_pos(apt.chan_ident(1), counts))
    assert msg.encode() == bytes([0x53, 0x04, 0x06, 0x00, 0xD0, 0x01, 0x02, 0x00, 0x6B, 0x01, 0x00, 0x00])


@pytest.mark.parametrize(
    "msg, expected",
    [
        (Message.short(MsgId.HW_REQ_INFO), "05 00 00 00 50 01"),
        (Message.short(MsgId.HW_STOP_UPDATEMSGS), "12 00 00 00 50 01"),
        (Message.short(MsgId.MOT_REQ_POSCOUNTER, 0x04), "11 04 04 00 50 01"),
        (Message.short(MsgId.MOD_SET_CHANENABLESTATE, 0x02, apt.DISABLE), "10 02 02 02 50 01"),
        (Message.short(MsgId.MOD_SET_CHANENABLESTATE, 0x01, apt.ENABLE), "10 02 01 01 50 01"),
        (Message.short(MsgId.MOT_MOVE_HOME, 0x04), "43 04 04 00 50 01"),
        (Message.short(MsgId.MOT_MOVE_STOP, 0x01, apt.STOP_PROFILED), "65 04 01 02 50 01"),
        (Message.short(MsgId.MOT_REQ_USTATUSUPDATE, 0x02), "90 04 02 00 50 01"),
        (Message.short(MsgId.POL_REQ_PARAMS), "31 05 00 00 50 01"),
        # device -> host: GET_POSCOUNTER for channel 1 at 1370 counts (0x055A)
        (Message.long(MsgId.MOT_GET_POSCOUNTER, apt.pack_chan_pos(0x01, 1370), dest=HOST, source=DEVICE),
         "12 04 06 00 81 50 01 00 5a 05 00 00"),
        # device -> host: MOVE_HOMED on channel 3 (short form)
        (Message.short(MsgId.MOT_MOVE_HOMED, 0x04, dest=HOST, source=DEVICE), "44 04 04 00 01 50"),
        # host -> device: POL_SET_PARAMS velocity 100 %, home 0, jog steps 10, 20, 30 counts
        (Message.long(MsgId.POL_SET_PARAMS, apt.PolParams(100, 0, 10, 20, 30).pack()),
         "30 05 0c 00 d0 01 00 00 64 00 00 00 0a 00 14 00 1e 00"),
    ],
)
def test_exact_bytes(msg: Message, expected: str) -> None:
    assert msg.encode() == bytes.fromhex(expected)
    assert apt.decode(bytes.fromhex(expected)) == msg


def test_negative_position_is_signed() -> None:
    data = apt.pack_chan_pos(0x01, -5)
    assert data == bytes.fromhex("01 00 fb ff ff ff")
    assert apt.unpack_chan_pos(data) == (0x01, -5)


def test_units_and_channel_idents() -> None:
    assert apt.degrees_to_counts(0.0) == 0
    assert apt.degrees_to_counts(170.0) == 1370
    assert apt.counts_to_degrees(1370) == pytest.approx(170.0)
    assert apt.counts_to_degrees(363) == pytest.approx(45.04, abs=0.01)
    assert [apt.chan_ident(i) for i in range(4)] == [0x01, 0x02, 0x04, 0x08]
    assert [apt.ident_paddle(x) for x in (0x01, 0x02, 0x04, 0x08)] == [0, 1, 2, 3]
    assert apt.ident_paddle(0x03) is None and apt.ident_paddle(0) is None


# -- payload layouts ---------------------------------------------------------------------------------------


def test_hw_info_layout() -> None:
    info = apt.HwInfo(serial=38123456, model="MPC320", hw_type=16, firmware=(1, 2, 3), notes="paddles",
                      hw_version=4, mod_state=5, channels=3)
    data = info.pack()
    assert len(data) == 84
    assert struct.unpack_from("<I", data, 0)[0] == 38123456
    assert data[4:12] == b"MPC320\x00\x00"
    assert struct.unpack_from("<H", data, 12)[0] == 16
    assert data[14:18] == bytes([3, 2, 1, 0])  # minor, interim, major, unused
    assert data[18:25] == b"paddles"
    assert struct.unpack_from("<HHH", data, 78) == (4, 5, 3)
    back = apt.HwInfo.unpack(data)
    assert back == info and back.firmware_str == "1.2.3"
    with pytest.raises(ValueError):
        apt.HwInfo.unpack(data[:80])


def test_status_update_layout_status_is_last_four_bytes() -> None:
    bits = apt.StatusBits.HOMED | apt.StatusBits.ENABLED
    st14 = apt.StatusUpdate(ident=0x02, position=363, status=int(bits), velocity=100)
    data = st14.pack()
    assert len(data) == 14
    assert data[:6] == apt.pack_chan_pos(0x02, 363)
    assert struct.unpack("<I", data[-4:])[0] == 0x80000400
    assert apt.StatusUpdate.unpack(data) == st14
    # a shorter structure (no velocity / current fields) still yields channel, position and status
    short = apt.pack_chan_pos(0x04, 7) + struct.pack("<I", 0x10)
    got = apt.StatusUpdate.unpack(short)
    assert (got.ident, got.position, got.status) == (0x04, 7, 0x10)
    with pytest.raises(ValueError):
        apt.StatusUpdate.unpack(b"\x01\x00\x00")


def test_pol_params_round_trip() -> None:
    p = apt.PolParams(velocity=55, home_position=12, jog1=1, jog2=2, jog3=3)
    assert apt.PolParams.unpack(p.pack()) == p
    with pytest.raises(ValueError):
        apt.PolParams.unpack(b"\x00" * 10)


# -- decode / frame reader ---------------------------------------------------------------------------------


def test_decode_rejects_wrong_lengths() -> None:
    good = Message.long(MsgId.MOT_GET_POSCOUNTER, apt.pack_chan_pos(1, 2), dest=HOST, source=DEVICE).encode()
    with pytest.raises(ValueError):
        apt.decode(good[:-1])
    with pytest.raises(ValueError):
        apt.decode(good[:4])
    with pytest.raises(ValueError):
        apt.decode(Message.short(MsgId.HW_REQ_INFO).encode() + b"\x00")


def _device_msgs() -> list[Message]:
    info = apt.HwInfo(serial=1, model="MPC320", channels=3).pack()
    return [
        Message.long(MsgId.HW_GET_INFO, info, dest=HOST, source=DEVICE),
        Message.short(MsgId.MOT_MOVE_HOMED, 0x01, dest=HOST, source=DEVICE),
        Message.long(MsgId.MOT_MOVE_COMPLETED, apt.StatusUpdate(0x02, 363, 0x80000400).pack(), dest=HOST,
                     source=DEVICE),
        Message.long(MsgId.MOT_GET_POSCOUNTER, apt.pack_chan_pos(0x04, 1370), dest=HOST, source=DEVICE),
        Message.short(MsgId.MOD_GET_CHANENABLESTATE, 0x02, apt.ENABLE, dest=HOST, source=DEVICE),
        Message.long(0x0999, b"", dest=HOST, source=DEVICE),  # unknown id, empty long form: still framed
    ]


def test_reader_byte_by_byte() -> None:
    msgs = _device_msgs()
    stream = b"".join(m.encode() for m in msgs)
    reader = FrameReader()
    out: list[Message] = []
    for i in range(len(stream)):
        got = reader.feed(stream[i:i + 1])
        out += got
        # nothing is emitted before its last byte arrives
        assert all(m in msgs for m in got)
    assert out == msgs
    assert reader.pending == 0 and reader.garbage_bytes == 0 and reader.messages == len(msgs)


def test_reader_waits_for_long_data() -> None:
    msg = _device_msgs()[0]
    raw = msg.encode()
    reader = FrameReader()
    assert reader.feed(raw[:6]) == []  # header only: 84 data bytes still to come
    assert reader.feed(raw[6:50]) == []
    assert reader.feed(raw[50:]) == [msg]


def test_reader_resynchronizes_after_garbage() -> None:
    msgs = _device_msgs()
    garbage = bytes([0xFF, 0x00, 0x13, 0x37, 0x50, 0x01, 0x81])
    # garbage before, between and after messages; and a "header" whose length is implausibly large
    bogus_long = struct.pack("<HHBB", 0x0464, 4000, HOST | 0x80, DEVICE)
    stream = garbage + msgs[0].encode() + garbage + msgs[1].encode() + bogus_long + msgs[2].encode()
    reader = FrameReader()
    assert reader.feed(stream) == msgs[:3]
    assert reader.garbage_bytes == 2 * len(garbage) + len(bogus_long)


def test_reader_ignores_messages_for_another_address() -> None:
    # a host-bound reader drops a frame addressed to the device (e.g. our own request echoed back)
    echo = Message.short(MsgId.HW_REQ_INFO).encode()
    reply = _device_msgs()[1]
    reader = FrameReader(own_address=HOST, peer_address=DEVICE)
    assert reader.feed(echo + reply.encode()) == [reply]
    assert reader.garbage_bytes == len(echo)
    # the device-side reader (as the simulator uses it) accepts it
    assert FrameReader(own_address=DEVICE, peer_address=None).feed(echo) == [apt.decode(echo)]


messages = st.one_of(
    st.builds(lambda i, a, b: Message.short(i, a, b, dest=HOST, source=DEVICE),
              st.integers(0, 0xFFFF), st.integers(0, 255), st.integers(0, 255)),
    st.builds(lambda i, d: Message.long(i, d, dest=HOST, source=DEVICE),
              st.integers(0, 0xFFFF), st.binary(max_size=90)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(messages, max_size=8), st.lists(st.integers(1, 40), min_size=1, max_size=20))
def test_round_trip_any_split(msgs: list[Message], cuts: list[int]) -> None:
    stream = b"".join(m.encode() for m in msgs)
    for m in msgs:
        assert apt.decode(m.encode()) == m
    reader = FrameReader()
    out: list[Message] = []
    pos, k = 0, 0
    while pos < len(stream):
        step = cuts[k % len(cuts)]
        out += reader.feed(stream[pos:pos + step])
        pos += step
        k += 1
    assert out == msgs
    assert reader.pending == 0 and reader.garbage_bytes == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=12).filter(lambda g: not set(g) & {HOST, HOST | 0x80, DEVICE}),
                          st.sampled_from(_device_msgs())), max_size=6))
def test_resync_after_garbage_between_device_messages(chunks: list[tuple[bytes, Message]]) -> None:
    # Resynchronization is a heuristic (APT has no sync bytes): a header is plausible when its dest byte is
    # ours and its source byte is the device. Garbage free of address bytes is therefore always skipped
    # before the real messages a paddle controller sends.
    reader = FrameReader()
    stream = b"".join(g + m.encode() for g, m in chunks)
    assert reader.feed(stream) == [m for _, m in chunks]
    assert reader.garbage_bytes == sum(len(g) for g, _ in chunks)


def test_message_validation_and_names() -> None:
    with pytest.raises(ValueError):
        Message.short(0x10000)
    with pytest.raises(ValueError):
        Message.short(MsgId.HW_REQ_INFO, 256)
    with pytest.raises(ValueError):
        Message(MsgId.HW_REQ_INFO, dest=0x80)
    assert Message.short(MsgId.MOT_MOVE_HOME, 1).name == "MOT_MOVE_HOME"
    assert Message.short(0x0999).name == "0x0999"
    req = Message.short(MsgId.MOT_REQ_POSCOUNTER, 0x01)
    rep = req.reply(MsgId.MOT_GET_POSCOUNTER, data=apt.pack_chan_pos(1, 0))
    assert (rep.dest, rep.source, rep.is_long) == (HOST, DEVICE, True)
