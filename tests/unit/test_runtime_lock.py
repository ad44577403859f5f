"""requirements/runtime.lock: the runtime's dependencies, pinned and hashed (issue 13, item 16).

The image installs from it with `pip install --require-hashes` and nothing else; `make install`
holds the dev venv's runtime packages at its versions; `make audit-deps` audits it. These
tests fail when pyproject's runtime dependencies and the lock drift apart (regenerate it with
`make lock`), and when torch or onnxruntime-gpu get into it.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "runtime.lock"
IMAGE_IN = ROOT / "requirements" / "image.in"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)\s*(;[^\\]*)?\\?$")
HASH = re.compile(r"^--hash=sha256:[0-9a-f]{64}$")
# the image's environment: CPython 3.11 on Linux (the lock is compiled for it)
IMAGE_ENV = {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.0",
             "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
             "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def _lock() -> dict[str, tuple[Version, list[str]]]:
    """name -> (pinned version, its hashes), parsed strictly: every requirement is one
    `name==version \\` line followed by its `--hash=sha256:` lines; anything else is a comment."""
    pins: dict[str, tuple[Version, list[str]]] = {}
    current: list[str] | None = None
    for number, raw in enumerate(LOCK.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            current = None
            continue
        if line.startswith("--hash="):
            assert current is not None, f"line {number}: a hash without a requirement"
            assert HASH.match(line.rstrip(" \\")), f"line {number}: {line}"
            current.append(line)
            continue
        match = PIN.match(line)
        assert match, f"line {number} is not an exact pin: {raw!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{name} pinned twice"
        current = []
        pins[name] = (Version(match.group(2)), current)
    return pins


def _runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def _image_requirements() -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in IMAGE_IN.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def test_every_line_is_pinned_with_a_hash() -> None:
    pins = _lock()
    assert len(pins) > 20
    unhashed = sorted(name for name, (_, hashes) in pins.items() if not hashes)
    assert not unhashed, f"no --hash for {unhashed}"
    text = LOCK.read_text()
    assert "-e " not in text and "git+" not in text and "file:" not in text


def test_every_runtime_dependency_is_pinned_within_pyprojects_range() -> None:
    """pyproject's [project.dependencies] (the runtime, no extras) and image.in, each pinned
    to a version its specifier allows, and the extras they ask for locked as well."""
    pins = _lock()
    for req in _runtime_requirements() + _image_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in {LOCK.name}: run `make lock`"
        version, _ = pins[name]
        assert req.specifier.contains(version, prereleases=True), \
            f"{name}=={version} is outside pyproject's {req}: run `make lock`"
    # celery[redis] needs redis, pyjwt[crypto] needs cryptography
    assert {"redis", "cryptography"} <= set(pins)


def test_no_torch_and_no_gpu_onnxruntime() -> None:
    pins = _lock()
    banned = {"torch", "onnxruntime-gpu", "transformers", "nvidia-cudnn-cu12", "triton"}
    assert not banned & set(pins), banned & set(pins)
    assert not [n for n in pins if n.startswith("nvidia-")]
    assert "onnxruntime" in pins  # the CPU build


def test_the_lock_is_closed_over_the_installed_runtime() -> None:
    """Every locked package's own requirements (for the image's Python and platform, with the
    extras pyproject asks for) are locked too, at versions they allow; read from the installed
    metadata of the packages this venv has."""
    pins = _lock()
    extras: dict[str, set[str]] = {}
    for req in _runtime_requirements() + _image_requirements():
        extras.setdefault(canonicalize_name(req.name), set()).update(req.extras)
    checked = 0
    for name, (version, _) in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an image-only package (flower): not installed in the dev venv
        if Version(dist.version) != version:
            continue  # checked by the next test
        checked += 1
        for raw in dist.requires or []:
            dep = Requirement(raw)
            wanted = [{**IMAGE_ENV, "extra": e} for e in extras.get(name, set()) | {""}]
            if dep.marker is not None and not any(dep.marker.evaluate(env) for env in wanted):
                continue
            dep_name = canonicalize_name(dep.name)
            assert dep_name in pins, f"{name} needs {dep}, which is not locked"
            assert dep.specifier.contains(pins[dep_name][0], prereleases=True), \
                f"{name} needs {dep}, the lock has {pins[dep_name][0]}"
    assert checked > 20


def test_the_tested_venv_runs_the_locked_versions() -> None:
    """`make install` holds the runtime's packages at the lock's versions (constraints): what
    the tests run is what the image ships. A mismatch means the venv predates the lock: run
    `make install`, or `make lock` after a deliberate upgrade."""
    mismatched = {}
    for name, (version, _) in _lock().items():
        if name in ("setuptools", "wheel"):
            continue  # build tools: the venv has its own
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue
        if installed != version:
            mismatched[name] = f"installed {installed}, locked {version}"
    assert not mismatched, mismatched
