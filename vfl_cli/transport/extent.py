"""How much a msgpack body may make decoding build, checked by walking its headers before msgpack runs.

A msgpack header can claim millions of elements in a few bytes, and 16 MiB of empty lists is ~1 GiB of Python
objects; msgpack's own per-container limits (`max_array_len`, ...) do not bound their total, their nesting or the
text they hold. `check_extent` reads the type bytes and lengths only, building nothing, and stops at the first
excess, so its work is bounded by the limits below, not by what the headers claim.
"""

from __future__ import annotations

from vfl_cli.errors import ProtocolError

# What decoding may build. The largest valid messages (see `codec`): a tensors message of 16 tensors has ~300
# objects, a hello ~100, an abort's reason 4 x 1000 bytes of UTF-8. Raw tensor bytes are not text: they are
# bounded by the body alone.
MAX_OBJECTS = 1024  # maps, lists, strings, numbers, ... in one body, counting each map key
MAX_DEPTH = 8  # nested maps and lists; a tensor's shape is 4 deep
MAX_TEXT_BYTES = 64 * 1024  # all strings of one body together

# msgpack's type bytes (github.com/msgpack/msgpack/blob/master/spec.md) and what follows them:
_NUMBERS = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}  # bytes
_BIN, _STR = {0xC4: 1, 0xC5: 2, 0xC6: 4}, {0xD9: 1, 0xDA: 2, 0xDB: 4}  # bytes of the length, then the payload
_LIST, _MAP = {0xDC: 2, 0xDD: 4}, {0xDE: 2, 0xDF: 4}  # bytes of the element count, then the elements


def check_extent(body: bytes) -> None:
    """Walk the msgpack headers of `body`, building nothing: ProtocolError when it is not one msgpack object,
    or holds more than MAX_OBJECTS objects, nests maps and lists deeper than MAX_DEPTH, carries more than
    MAX_TEXT_BYTES of strings, or an extension type (no vfl message has one). Stops at the first excess, so
    the work is bounded by the limits, not by the lengths the headers claim."""
    pos = objects = text = 0
    unread = [1]  # objects still to read at each open level, outermost first (the body itself is one)
    while unread:
        if unread[-1] == 0:
            unread.pop()
            continue
        unread[-1] -= 1
        objects += 1
        tag = _read(body, pos, 1)
        pos += 1
        children = -1  # objects inside, when it is a map or list
        if tag <= 0x7F or tag >= 0xE0 or tag in (0xC0, 0xC2, 0xC3):  # fixint, nil, false, true
            pass
        elif tag <= 0x8F:  # fixmap: key and value per entry
            children = 2 * (tag & 0x0F)
        elif tag <= 0x9F:  # fixarray
            children = tag & 0x0F
        elif tag <= 0xBF:  # fixstr
            pos += tag & 0x1F
            text += tag & 0x1F
        elif tag in _NUMBERS:
            pos += _NUMBERS[tag]
        elif tag in _BIN or tag in _STR:
            width = _BIN.get(tag) or _STR[tag]
            length = _read(body, pos, width)
            pos += width + length
            text += length if tag in _STR else 0
        elif tag in _LIST or tag in _MAP:
            width = _LIST.get(tag) or _MAP[tag]
            children = _read(body, pos, width) * (2 if tag in _MAP else 1)
            pos += width
        elif tag == 0xC1:
            raise ProtocolError("body is not valid msgpack (reserved byte 0xc1)")
        else:  # ext 0xc7..0xc9, fixext 0xd4..0xd8
            raise ProtocolError("body: msgpack extension types are not part of the vfl wire format")
        if pos > len(body):
            raise ProtocolError("body is not valid msgpack (truncated)")
        if text > MAX_TEXT_BYTES:
            raise ProtocolError(f"body: more than {MAX_TEXT_BYTES} bytes of strings, more than any vfl message")
        if children >= 0:
            if objects + sum(unread) + children > MAX_OBJECTS:  # what is read, what is announced, and these
                raise ProtocolError(f"body: more than {MAX_OBJECTS} msgpack objects, more than any vfl message")
            if len(unread) > MAX_DEPTH:  # unread holds one level per open container, plus the body's
                raise ProtocolError(f"body: maps and lists nested deeper than {MAX_DEPTH}")
            unread.append(children)
    if pos != len(body):
        raise ProtocolError("body is not valid msgpack (trailing bytes after the message)")


def _read(body: bytes, pos: int, width: int) -> int:
    """The big-endian unsigned integer of `width` bytes at `pos`."""
    if pos + width > len(body):
        raise ProtocolError("body is not valid msgpack (truncated)")
    return int.from_bytes(body[pos : pos + width], "big")
