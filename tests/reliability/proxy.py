"""A fault-injecting HTTP/1.1 proxy on loopback, in front of HAPI (asyncio, one thread).

At `rate` of requests (seeded) it answers 500, 503 with or without Retry-After, 429 with
Retry-After, resets the connection (RST, no answer), delays the answer, delays it past the
client's timeout (the request still reaches the server afterwards), or forwards a POST and
then answers 500 although the server committed it ("post-commit"). Everything else is
forwarded as is. Counts of what it did are in `counts`.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx

FAULTS = ("500", "503-retry-after", "503", "429", "reset", "delay", "delay-past-timeout",
          "post-commit-500")
# hop-by-hop and framing headers; Host is kept so HAPI's paging links name the proxy
HOP = {"content-length", "connection", "transfer-encoding", "accept-encoding",
       "keep-alive", "content-encoding"}
OUTCOME = json.dumps({"resourceType": "OperationOutcome", "issue": [
    {"severity": "error", "code": "transient", "diagnostics": "injected fault"}]}).encode()


class FaultProxy:
    def __init__(self, upstream: str, rate: float = 0.2, seed: int = 0,
                 faults: tuple[str, ...] = FAULTS, delay_s: tuple[float, float] = (0.5, 3.0),
                 past_timeout_s: float = 12.0,
                 choose: Callable[[str, str, bytes], str | None] | None = None) -> None:
        self.upstream = upstream.rstrip("/")  # http://127.0.0.1:8091 (no path)
        self.rate, self.faults = rate, faults
        self.rng = random.Random(seed)
        self.delay_s, self.past_timeout_s = delay_s, past_timeout_s
        self.choose = choose  # deterministic override: fault name, "" for none, None: random
        self.counts: Counter[str] = Counter()
        self.requests = 0
        self.with_bearer = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> int:
        self._thread = threading.Thread(target=self._run, daemon=True, name="fault-proxy")
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self.port

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def url(self, path: str = "/fhir") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._http = httpx.AsyncClient(timeout=120)
        self._server = loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            loop.run_until_complete(self._http.aclose())
            loop.close()

    # -- one connection, several requests (keep-alive) -----------------------------------------
    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(10_000):
                line = await reader.readline()
                if not line.strip():
                    break
                method, target, _version = line.decode("latin-1").split(" ", 2)
                headers: list[tuple[str, str]] = []
                for _h in range(200):
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = h.decode("latin-1").partition(":")
                    headers.append((name.strip(), value.strip()))
                lower = {k.lower(): v for k, v in headers}
                body = await self._body(reader, lower)
                if not await self._answer(writer, method, target, headers, lower, body):
                    break
                if lower.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()

    @staticmethod
    async def _body(reader: asyncio.StreamReader, lower: dict[str, str]) -> bytes:
        if "content-length" in lower:
            return await reader.readexactly(int(lower["content-length"]))
        if lower.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            for _ in range(100_000):
                size = int((await reader.readline()).strip().split(b";")[0], 16)
                if size == 0:
                    await reader.readline()
                    return out
                out += await reader.readexactly(size)
                await reader.readline()
        return b""

    def _pick(self, method: str, target: str, body: bytes) -> str:
        self.requests += 1
        if self.choose is not None:
            forced = self.choose(method, target, body)
            if forced is not None:
                return forced
        if self.rng.random() >= self.rate:
            return ""
        fault = self.rng.choice(self.faults)
        if fault == "post-commit-500" and method != "POST":
            fault = "500"
        return fault

    async def _answer(self, writer: asyncio.StreamWriter, method: str, target: str,
                      headers: list[tuple[str, str]], lower: dict[str, str],
                      body: bytes) -> bool:
        """Answer one request; False when the connection must end."""
        if lower.get("authorization", "").startswith("Bearer "):
            self.with_bearer += 1
        fault = self._pick(method, target, body)
        if fault:
            self.counts[fault] += 1
        if fault == "reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if fault in ("500", "503", "503-retry-after", "429"):
            extra = [("Retry-After", "1")] if fault in ("503-retry-after", "429") else []
            await self._write(writer, int(fault[:3]), extra, OUTCOME)
            return True
        if fault == "delay":
            await asyncio.sleep(self.rng.uniform(*self.delay_s))
        elif fault == "delay-past-timeout":
            await asyncio.sleep(self.past_timeout_s)
        fwd = [(k, v) for k, v in headers if k.lower() not in HOP]
        try:
            response = await self._http.request(method, self.upstream + target, headers=fwd,
                                                content=body)
        except httpx.HTTPError:
            await self._write(writer, 502, [], OUTCOME)
            return True
        if fault == "post-commit-500":  # the server did it; the client hears it failed
            await self._write(writer, 500, [], OUTCOME)
            return True
        keep = [(k, v) for k, v in response.headers.items() if k.lower() not in HOP | {"host"}]
        await self._write(writer, response.status_code, keep, response.content)
        return True

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, status: int, headers: list[tuple[str, str]],
                     body: bytes) -> None:
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        if not any(k.lower() == "content-type" for k, _ in headers):
            headers = [*headers, ("Content-Type", "application/fhir+json")]
        head += [f"{k}: {v}" for k, v in headers] + [f"Content-Length: {len(body)}", "", ""]
        writer.write("\r\n".join(head).encode("latin-1") + body)
        await writer.drain()


_REASONS: dict[int, str] = {200: "OK", 201: "Created", 400: "Bad Request", 404: "Not Found",
                            429: "Too Many Requests", 500: "Internal Server Error",
                            502: "Bad Gateway", 503: "Service Unavailable"}


def is_report_transaction(method: str, target: str, body: bytes) -> bool:
    """The report's own transaction (the one with the DiagnosticReport conditional create)."""
    return method == "POST" and b'"DiagnosticReport"' in body and b'"transaction"' in body


def describe(proxy: FaultProxy) -> dict[str, Any]:
    return {"requests": proxy.requests, "faults": dict(proxy.counts),
            "fault_share": round(sum(proxy.counts.values()) / max(1, proxy.requests), 3),
            "requests_with_bearer": proxy.with_bearer}
