"""A client for any OpenAI-compatible chat completions endpoint (vLLM, Ollama, llama.cpp server,
a hosted API), made for bulk teacher annotation: on-disk cache, concurrency and rate limits,
bounded retries honouring Retry-After, token accounting.

The API key is read from the environment at each request and never logged or cached; cache
entries are keyed by sha256 of (model, messages, parameters), never by the endpoint or key.
Plain http is refused to a non-loopback host (the key and the patients' notes travel there)
unless `allow_insecure_http` is set, as for the FHIR endpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from clinragen_fhir.fhir.client import parse_retry_after
from clinragen_fhir.fhir.errors import FhirConfigError
from clinragen_fhir.fhir.urls import check_url
from clinragen_fhir.retry import RetryPolicy

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}


class LLMError(RuntimeError):
    """The endpoint failed for good (non-retryable status, or retries used up)."""


class _Transient(Exception):
    """One try got no answer or a RETRYABLE status: the retry policy tries again."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass(frozen=True)
class LLMConfig:
    base_url: str  # e.g. http://127.0.0.1:8000/v1 (the client appends /chat/completions)
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"  # name of the env var; unset = no auth header
    temperature: float = 0.0
    max_tokens: int = 400
    timeout_s: float = 120.0
    concurrency: int = 4  # requests in flight at most
    rate_per_s: float = 2.0  # request starts per second at most (0 = unlimited)
    retries: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    cache_dir: Path | None = None
    allow_insecure_http: bool = False  # plain http to a non-loopback host


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool


@dataclass
class UsageStats:
    """Totals over the client's lifetime (thread-safe updates)."""

    requests: int = 0  # HTTP requests sent, retries included
    completions: int = 0  # answers returned to callers, cache hits included
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("requests", "completions", "cache_hits",
                                              "retries", "prompt_tokens", "completion_tokens")}


class RateLimiter:
    """At most `rate` starts per second: each caller reserves the next free slot and sleeps."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


def cache_key(model: str, messages: Messages, params: dict[str, Any]) -> str:
    blob = json.dumps({"model": model, "messages": messages, "params": params},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class LLMClient:
    """Thread-safe; `complete_many` runs up to `concurrency` requests at once."""

    def __init__(self, config: LLMConfig, transport: httpx.BaseTransport | None = None) -> None:
        try:
            check_url(config.base_url, "teacher base_url", config.allow_insecure_http)
        except FhirConfigError as exc:
            raise LLMError(str(exc)) from None
        self.config = config
        self.stats = UsageStats()
        self._limiter = RateLimiter(config.rate_per_s)
        self._slots = threading.BoundedSemaphore(max(1, config.concurrency))
        self._http = httpx.Client(base_url=config.base_url.rstrip("/") + "/",
                                  timeout=config.timeout_s, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _params(self, overrides: dict[str, Any]) -> dict[str, Any]:
        return {"temperature": self.config.temperature, "max_tokens": self.config.max_tokens,
                **overrides}

    def _cache_path(self, key: str) -> Path | None:
        d = self.config.cache_dir
        return d / key[:2] / f"{key}.json" if d is not None else None

    def complete(self, messages: Messages, **params: Any) -> Completion:
        """One chat completion, from the cache when the same request was answered before."""
        p = self._params(params)
        key = cache_key(self.config.model, messages, p)
        path = self._cache_path(key)
        if path is not None and path.exists():
            hit = json.loads(path.read_text(encoding="utf-8"))
            self.stats.add(completions=1, cache_hits=1)
            return Completion(hit["text"], int(hit["prompt_tokens"]),
                              int(hit["completion_tokens"]), cached=True)
        body = {"model": self.config.model, "messages": messages, **p}
        with self._slots:
            data = self._post(body)
        try:
            text = str(data["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError) as exc:
            raise LLMError("chat completion answer has no choices[0].message.content") from exc
        usage = data.get("usage") or {}
        out = Completion(text, int(usage.get("prompt_tokens") or 0),
                         int(usage.get("completion_tokens") or 0), cached=False)
        self.stats.add(completions=1, prompt_tokens=out.prompt_tokens,
                       completion_tokens=out.completion_tokens)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps({"model": self.config.model, "text": text,
                                       "prompt_tokens": out.prompt_tokens,
                                       "completion_tokens": out.completion_tokens}),
                           encoding="utf-8")
            tmp.replace(path)  # atomic: a killed run never leaves half an entry
        return out

    def complete_many(self, batch: Sequence[Messages], **params: Any) -> list[Completion]:
        """Answers in the order asked; concurrency and rate limits hold across the batch."""
        if not batch:
            return []
        workers = max(1, min(self.config.concurrency, len(batch)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda m: self.complete(m, **params), batch))

    def _headers(self) -> dict[str, str]:
        env = self.config.api_key_env
        key = (os.environ.get(env) or "").strip() if env else ""  # a file's trailing newline
        return {"Authorization": f"Bearer {key}"} if key else {}

    def policy(self) -> RetryPolicy:
        """The teacher's layer of the retry policy (clinragen_fhir/retry.py): `retries` + 1
        tries of one completion, for no answer (timeouts included) and the RETRYABLE statuses;
        nothing above this layer retries, so that is the bound per completion."""
        c = self.config
        return RetryPolicy(attempts=c.retries + 1, backoff_s=c.backoff_s,
                           max_backoff_s=c.max_backoff_s,
                           retry_on=lambda exc: isinstance(exc, _Transient))

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        def logged(failed: int, error: BaseException, delay: float) -> None:
            log.warning("llm retry", extra={"fields": {"attempt": failed, "reason": str(error),
                                                        "delay_s": round(delay, 2)}})
            self.stats.add(retries=1)

        tries = [0]

        def attempt() -> dict[str, Any]:
            tries[0] += 1
            return self._attempt(body)

        try:
            return self.policy().call(attempt, on_retry=logged)
        except _Transient as exc:
            raise LLMError(f"chat completion failed after {tries[0]} tries: {exc}") from None

    def _attempt(self, body: dict[str, Any]) -> dict[str, Any]:
        """One request: the answer's JSON object, else _Transient (a retry can help) or
        LLMError (final)."""
        self._limiter.wait()
        self.stats.add(requests=1)
        try:
            response = self._http.post("chat/completions", json=body, headers=self._headers())
        except httpx.TransportError as exc:  # timeouts included
            raise _Transient(type(exc).__name__) from None
        if response.status_code in RETRYABLE:
            raise _Transient(f"HTTP {response.status_code}",
                             parse_retry_after(response.headers.get("Retry-After")))
        if response.status_code >= 400:
            raise LLMError(f"chat completion failed: HTTP {response.status_code} "
                           f"{response.text[:200]}")
        try:
            data = response.json()
        except ValueError as exc:
            raise LLMError("chat completion answer is not JSON") from exc
        if not isinstance(data, dict):
            raise LLMError("chat completion answer is not a JSON object")
        return data
