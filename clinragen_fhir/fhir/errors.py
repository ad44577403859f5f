"""FHIR client errors: one base class, and whether a retry can help."""

from __future__ import annotations


class FhirError(Exception):
    """Anything that went wrong talking to the FHIR server."""

    retryable: bool = False
    retry_after: float | None = None


def is_retryable(exc: BaseException) -> bool:
    """The retry decision, as the error itself made it: what every layer of the retry policy
    (clinragen_fhir/retry.py: the client, the task) asks."""
    return isinstance(exc, FhirError) and exc.retryable


class FhirUnavailable(FhirError):
    """No answer: connection refused or reset, or a timeout. Worth retrying."""

    retryable = True


class FhirHTTPError(FhirError):
    """The server answered with an error status; the OperationOutcome text is kept."""

    def __init__(self, status: int, method: str, path: str, detail: str,
                 retry_after: float | None = None) -> None:
        self.status = status
        self.method = method
        self.path = path  # resource path without the query (the query can carry patient ids)
        self.detail = detail
        self.retry_after = retry_after
        # 409 on a write: HAPI answers concurrent conditional creates of the same resource (two
        # workers creating our Device, say) with a unique-constraint conflict; every write we make
        # is idempotent, so trying again finds the winner's resource instead of making another.
        # A 409 on DELETE means other resources still refer to it: trying again cannot help.
        self.retryable = status in (408, 429, 500, 502, 503, 504) or (
            status == 409 and method in ("POST", "PUT"))
        super().__init__(f"{method} {path}: HTTP {status}: {detail}")


class TokenError(FhirError):
    """The token endpoint gave no usable token. The retry decision is made here: no answer, a
    timeout, 408, 429 and 5xx are blips (retried, else one outage dead-letters every task); any
    other refusal or a malformed answer is final."""

    def __init__(self, message: str, status: int | None = None, unreachable: bool = False,
                 retry_after: float | None = None) -> None:
        self.status = status
        self.retryable = unreachable or status in (408, 429) or (status or 0) >= 500
        self.retry_after = retry_after
        super().__init__(message)


class FhirTooLarge(FhirError):
    """An answer or a search past a configured bound (bytes on the wire or decoded, pages, a
    search's bytes). Final: the same request gets the same answer, and reading it whole is what
    would take the worker down (a gzip bomb, a search that never ends)."""


class FhirConfigError(FhirError):
    """The endpoint configuration is unsafe or incomplete (e.g. plain http to a remote host)."""
