"""Read the members of a top-level JSON object one at a time, without loading the file.

PubMedQA's PQA-A (`ori_pqaa.json`, 211k questions, a few hundred MB) is one JSON object keyed
by PMID. `json.load` holds the whole text and every record of it at once (several GB of
Python objects); this reader keeps one chunk of text and one record in memory, decoding each
value with `json.JSONDecoder.raw_decode`, so memory stays flat however big the file is.

    for pmid, record in iter_object_members(Path("ori_pqaa.json")):
        ...
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

CHUNK_CHARS = 1 << 20
_WHITESPACE = " \t\n\r"
_NUMBER_CHARS = "0123456789.eE+-"


class JSONStreamError(ValueError):
    """The file is not one JSON object; the message says where (character offset)."""


class _Reader:
    """A text buffer over a file that grows on demand and forgets what was consumed."""

    def __init__(self, handle, chunk: int):
        self.handle, self.chunk = handle, chunk
        self.buf, self.pos, self.offset, self.eof = "", 0, 0, False  # offset: chars dropped before buf

    def more(self) -> bool:
        if self.eof:
            return False
        text = self.handle.read(self.chunk)
        self.offset += self.pos
        self.buf, self.pos = self.buf[self.pos:] + text, 0
        self.eof = not text
        return bool(text)

    def peek(self) -> str:
        """The next non-blank character ('' at the end of the file), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos:self.pos + 1]

    def expect(self, chars: str, what: str) -> str:
        char = self.peek()
        if not char or char not in chars:
            raise JSONStreamError(f"expected {what} at character {self.offset + self.pos}, "
                                  f"found {char or 'the end of the file'!r}")
        self.pos += 1
        return char

    def value(self, decoder: json.JSONDecoder) -> Any:
        """Decode the next JSON value, reading more text until it is complete."""
        self.peek()
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                if self.more():
                    continue
                raise JSONStreamError(f"{exc.msg} at character {self.offset + exc.pos}") from None
            # A number that reaches the end of the buffer ("12", "1.", "1e") may go on in the next chunk.
            if _is_number(value) and not self.buf[end:].strip(_NUMBER_CHARS) and self.more():
                continue
            self.pos = end
            return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def iter_object_members(path: Path, chunk: int | None = None) -> Iterator[tuple[str, Any]]:
    """(key, value) of each member of the JSON object in `path`, in file order.

    Raises JSONStreamError if the file is not one JSON object, or a key appears twice (which
    `json.load` would silently resolve by keeping the last one).
    """
    decoder = json.JSONDecoder()
    seen: set[str] = set()
    with open(path, encoding="utf-8-sig") as handle:  # -sig: a BOM is not content
        reader = _Reader(handle, chunk or CHUNK_CHARS)
        reader.expect("{", "'{' (a JSON object)")
        if reader.peek() == "}":
            reader.pos += 1
        else:
            while True:
                if reader.peek() != '"':
                    reader.expect('"', "a member name in double quotes")
                key = reader.value(decoder)
                if key in seen:
                    raise JSONStreamError(f"key {key!r} appears twice")
                seen.add(key)
                reader.expect(":", "':' after a member name")
                yield key, reader.value(decoder)
                if reader.expect(",}", "',' or '}' after a member") == "}":
                    break
        if reader.peek():
            raise JSONStreamError(f"extra data after the object at character {reader.offset + reader.pos}")
