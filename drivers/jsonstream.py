"""Cutting a text stream of JSON objects that are ``\\x17``-separated and/or concatenated (``}{``).

The Single Quantum Eos speaks this framing in both directions, so the driver
(:class:`drivers.singlequantum_eos.JsonFramer`) and the simulator (:mod:`drivers.sim.instruments.eos`) share
:func:`split_objects`.
"""

from __future__ import annotations

__all__ = ["ETB", "MAX_PENDING", "split_objects"]

ETB = "\x17"
MAX_PENDING = 1 << 20  # an unterminated object longer than this is given up as garbage


def split_objects(buf: str, garbage_ends: str = "{" + ETB) -> tuple[list[tuple[bool, str]], str]:
    """Cut ``buf`` into ``(items, rest)``.

    Each item is ``(True, text)`` for a brace-balanced object or ``(False, text)`` for garbage: text outside
    any object (up to the next character in ``garbage_ends``), or an object cut short by ``\\x17``. ``rest``
    is an incomplete object to keep until more data arrives (one longer than :data:`MAX_PENDING` becomes
    garbage instead). ``\\x17`` and whitespace between objects are skipped.
    """
    items: list[tuple[bool, str]] = []
    i, n = 0, len(buf)
    while i < n:
        c = buf[i]
        if c == ETB or c.isspace():
            i += 1
            continue
        if c != "{":
            j = i
            while j < n and buf[j] not in garbage_ends:
                j += 1
            items.append((False, buf[i:j]))
            i = j
            continue
        end, cut = _object_end(buf, i)
        if end is not None:
            items.append((True, buf[i:end]))
            i = end
        elif cut is not None:
            items.append((False, buf[i:cut]))
            i = cut + 1
        else:
            rest = buf[i:]
            if len(rest) > MAX_PENDING:
                items.append((False, rest[:80] + "..."))
                return items, ""
            return items, rest
    return items, ""


def _object_end(buf: str, start: int) -> tuple[int | None, int | None]:
    """(end, None) if the object at ``start`` closes at ``end``; (None, k) if an ETB at k cuts it; (None, None)
    if the buffer ends first."""
    depth, in_str, esc = 0, False, False
    for j in range(start, len(buf)):
        ch = buf[j]
        if ch == ETB:
            return None, j
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return j + 1, None
    return None, None
