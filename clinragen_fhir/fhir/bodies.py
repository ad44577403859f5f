"""An answer's body read as a stream under byte caps, on the wire and decoded: a server's answer
(a gzip bomb: 0.3 MiB inflating to 300 MiB) cannot exhaust the worker. Only gzip and deflate
are offered, each inflated by a bounded inflater a piece at a time."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import httpx

from clinragen_fhir.fhir.errors import (
    FhirError,
    FhirTooLarge,
)

# Defaults of the bounds (FhirEndpoint's settings carry them; each reason is given there).
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # one answer's body, decoded


MAX_WIRE_BYTES = 64 * 1024 * 1024  # one answer's body as sent (compressed)


_CHUNK = 64 * 1024  # read and inflate at most this much at a time


# Only the codings decoded here, each by a bounded inflater (httpx's own inflates a chunk
# whole, and would offer br/zstd as soon as those packages were installed).
ACCEPT_ENCODING = "gzip, deflate"


_WBITS = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}


class _Body:
    """Decoded pieces counted against the limit as they come, joined once at the end."""

    def __init__(self, limit: int, where: str) -> None:
        self.pieces: list[bytes] = []
        self.size = 0
        self.limit, self.where = limit, where

    def add(self, piece: bytes) -> None:
        self.pieces.append(piece)
        self.size += len(piece)
        if self.size > self.limit:
            raise FhirTooLarge(f"{self.where}: answer passes {self.limit} bytes decoded "
                               "(max_response_bytes)")

    def inflate(self, inflater: Any, data: bytes) -> None:
        """Add `data` inflated a piece at a time, never past the limit in all: one 0.3 MiB
        gzip chunk inflates to 300 MiB if asked for all at once (and zlib's output buffer is
        copied once more at the end of each call)."""
        while True:
            room = min(_CHUNK, self.limit + 1 - self.size)  # >= 1: 0 would mean unbounded
            piece = inflater.decompress(data, room)
            self.add(piece)
            data = inflater.unconsumed_tail
            if not data and len(piece) < room:  # a full piece may leave output inside zlib
                return


def read_capped(response: httpx.Response, where: str, limit: int = MAX_RESPONSE_BYTES,
                wire_limit: int = MAX_WIRE_BYTES) -> bytes:
    """The body of a streamed response, decoded, aborting with FhirTooLarge as soon as the bytes
    on the wire pass `wire_limit` or the decoded ones pass `limit`: the whole body is never held
    before the cap applies."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > wire_limit:
        raise FhirTooLarge(f"{where}: answer of {declared} bytes is over {wire_limit} "
                           "(max_wire_bytes)")
    codings = [c.strip().lower() for c in response.headers.get("Content-Encoding", "").split(",")
               if c.strip().lower() not in ("", "identity")]
    if len(codings) > 1 or (codings and codings[0] not in _WBITS):
        raise FhirError(f"{where}: answer in content-encoding {', '.join(codings)[:40]!r}, "
                        f"not one of {ACCEPT_ENCODING}")
    out = _Body(limit, where)
    try:
        chunks: Iterable[bytes] = response.iter_raw(_CHUNK)
        next_chunk = next(iter(chunks), None)  # iter_raw raises StreamConsumed here
    except httpx.StreamConsumed:  # a transport that answered a read body (test transports)
        body = response.content
        if len(body) > limit:
            raise FhirTooLarge(f"{where}: answer of {len(body)} bytes is over {limit} "
                               "(max_response_bytes)") from None
        return body
    inflater = zlib.decompressobj(_WBITS[codings[0]]) if codings else None
    first = True
    for chunk in _prepend(next_chunk, chunks):
        if response.num_bytes_downloaded > wire_limit:
            raise FhirTooLarge(f"{where}: answer passes {wire_limit} bytes on the wire "
                               "(max_wire_bytes)")
        if inflater is None:
            out.add(chunk)
            continue
        try:
            out.inflate(inflater, chunk)
        except zlib.error:
            if not (first and codings[0] == "deflate"):
                raise FhirError(f"{where}: answer does not decode ({codings[0]})") from None
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # "deflate" sent raw, as some do
            out = _Body(limit, where)
            try:
                out.inflate(inflater, chunk)
            except zlib.error:
                raise FhirError(f"{where}: answer does not decode ({codings[0]})") from None
        first = False
    return b"".join(out.pieces)


def _prepend(first: bytes | None, rest: Iterable[bytes]) -> Iterator[bytes]:
    """The chunk taken to probe the stream, then the rest."""
    if first is not None:
        yield first
        yield from rest
