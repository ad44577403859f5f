#!/usr/bin/env python3
"""Container health check for the ClinRaGen-FHIR image (no curl in it): exit 0 healthy, 1 not.

  clinragen-healthcheck http URL [STATUS,...]   GET URL answers one of STATUS (default 200)
  clinragen-healthcheck worker                  this host's Celery worker answers a ping
  clinragen-healthcheck beat FILE MAX_AGE_S     beat's schedule file (FILE*) written in MAX_AGE_S
  clinragen-healthcheck                         the image default: `worker`

Used by the image's HEALTHCHECK, the compose services and the Helm chart's exec probes.
"""

from __future__ import annotations

import glob
import os
import socket
import sys
import time
import urllib.error
import urllib.request


def http(url: str, accept: str = "200") -> bool:
    ok = {int(s) for s in accept.split(",")}
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (loopback only)
            return response.status in ok
    except urllib.error.HTTPError as exc:
        return exc.code in ok
    except OSError:
        return False


def worker() -> bool:
    from clinragen_fhir.worker.app import app

    name = f"celery@{socket.gethostname()}"
    return bool(app.control.ping(destination=[name], timeout=5.0))


def beat(path: str, max_age_s: str) -> bool:
    files = glob.glob(path + "*")
    return bool(files) and time.time() - max(map(os.path.getmtime, files)) < float(max_age_s)


def main(argv: list[str]) -> int:
    mode, *args = argv or ["worker"]
    checks = {"http": http, "worker": worker, "beat": beat}
    if mode not in checks:
        print(f"clinragen-healthcheck: unknown check {mode!r} ({', '.join(checks)})",
              file=sys.stderr)
        return 2
    try:
        healthy = checks[mode](*args)
    except Exception as exc:  # noqa: BLE001 (any failure is "unhealthy", with its reason)
        print(f"clinragen-healthcheck {mode}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
