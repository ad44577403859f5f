"""Seeded Synthea cohorts from the generator on Maven Central, cached outside the work tree.

Synthea 3.3.0 (`org.mitre.synthea:synthea:3.3.0`, Apache-2.0, MITRE) is resolved with
`mvn dependency:copy-dependencies` on a one-dependency pom and run as
`java -cp 'lib/*' App -p N -s SEED STATE`. Nobody on this project wrote it, which is the point:
the model is trained and judged on records we did not shape.

A cohort is keyed by the generator version and every setting (patients, seed, state, ages,
history), so a later session on the same machine reuses it. It is written in chunks (each its own
seed, derived from the cohort's) into `chunk-NNN/fhir/*.ndjson`; a finished chunk has a
`done.json`, so a stopped generation resumes at the first unfinished chunk. `cohort.json` appears
once every chunk is done.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SYNTHEA_VERSION = "3.3.0"
# Resources the dataset never reads: leaving them out makes a cohort ~3x smaller and faster.
# DiagnosticReport stays: Synthea writes the DocumentReference notes only beside it.
EXCLUDED = ("Claim", "ExplanationOfBenefit", "Provenance", "Medication", "MedicationRequest",
            "MedicationAdministration", "Procedure", "ImagingStudy", "SupplyDelivery",
            "CarePlan", "CareTeam", "Immunization", "AllergyIntolerance", "Device",
            "Location", "Organization", "Practitioner", "PractitionerRole")
POM = f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>clinragen</groupId><artifactId>synthea-fetch</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.mitre.synthea</groupId><artifactId>synthea</artifactId>
      <version>{SYNTHEA_VERSION}</version></dependency>
  </dependencies>
</project>
"""


def cache_root() -> Path:
    """`$CLINRAGEN_CACHE` or `~/.cache/clinragen`: never inside the work tree."""
    return Path(os.environ.get("CLINRAGEN_CACHE") or Path.home() / ".cache" / "clinragen")


@dataclass(frozen=True)
class CohortSpec:
    """Everything that determines a cohort's records."""

    patients: int
    seed: int
    state: str = "Massachusetts"
    ages: str = ""  # Synthea -a, e.g. "20-90"; "" = the generator's default
    years_of_history: int = 10
    chunk: int = 250
    version: str = SYNTHEA_VERSION
    # Synthea -r YYYYMMDD, the day the records end; "" = the day it runs, so a cohort generated
    # on another day differs (ages, the last visits): set it for a reproducible cohort
    reference_date: str = ""

    @property
    def key(self) -> str:
        fields = asdict(self)
        if not self.reference_date:  # the key of a cohort from before the field existed
            del fields["reference_date"]
        raw = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(raw).hexdigest()[:12]

    @property
    def name(self) -> str:
        state = self.state.replace(" ", "_").lower()
        return f"synthea-{self.version}-{state}-s{self.seed}-p{self.patients}-{self.key}"

    def chunks(self) -> list[tuple[int, int, int]]:
        """(index, patients, seed) per chunk; chunk seeds derive from the cohort seed."""
        out, left, i = [], self.patients, 0
        while left > 0:
            n = min(self.chunk, left)
            out.append((i, n, self.seed * 1000 + i))
            left, i = left - n, i + 1
        return out


def generator(cache: Path | None = None) -> Path:
    """The folder of Synthea's jars (fetched from Maven Central once)."""
    home = (cache or cache_root()) / f"synthea-{SYNTHEA_VERSION}"
    lib = home / "lib"
    if (home / "fetched.json").is_file():
        return lib
    home.mkdir(parents=True, exist_ok=True)
    (home / "pom.xml").write_text(POM)
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RuntimeError("Maven (mvn) is needed to fetch Synthea from Maven Central")
    subprocess.run([mvn, "-q", "-B", "dependency:copy-dependencies",
                    f"-DoutputDirectory={lib}"], cwd=home, check=True)
    jars = sorted(p.name for p in lib.glob("*.jar"))
    if f"synthea-{SYNTHEA_VERSION}.jar" not in jars:
        raise RuntimeError(f"Maven did not bring synthea-{SYNTHEA_VERSION}.jar into {lib}")
    (home / "fetched.json").write_text(json.dumps({"jars": len(jars)}))
    return lib


def chunk_dirs(cohort_dir: Path) -> list[Path]:
    """The NDJSON folders of a generated cohort (one per chunk), in order."""
    return sorted(p / "fhir" for p in cohort_dir.glob("chunk-*") if (p / "done.json").is_file())


def generate(spec: CohortSpec, cache: Path | None = None, java_heap: str = "2g",
             threads: int = 1) -> Path:
    """Generate (or reuse) the cohort; returns its folder. Resumes chunk by chunk."""
    root = cache or cache_root()
    lib = generator(root)
    out = root / "cohorts" / spec.name
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("w") as lock:  # a second session waits instead of regenerating
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _generate(spec, lib, out, java_heap, threads)


def _generate(spec: CohortSpec, lib: Path, out: Path, java_heap: str, threads: int) -> Path:
    (out / "spec.json").write_text(json.dumps(asdict(spec), indent=1))
    if (out / "cohort.json").is_file():
        return out
    started = time.monotonic()
    for index, n, seed in spec.chunks():
        chunk = out / f"chunk-{index:03d}"
        if (chunk / "done.json").is_file():
            continue
        if chunk.exists():
            shutil.rmtree(chunk)
        tmp = out / f".tmp-{index:03d}"
        if tmp.exists():
            shutil.rmtree(tmp)
        cmd = ["java", f"-Xmx{java_heap}", "-cp", f"{lib}/*", "App", "-p", str(n),
               "-s", str(seed), "-cs", str(seed),
               f"--exporter.baseDirectory={tmp}", "--exporter.fhir.bulk_data=true",
               f"--exporter.years_of_history={spec.years_of_history}",
               "--exporter.hospital.fhir.export=false",
               "--exporter.practitioner.fhir.export=false",
               "--exporter.metadata.export=false",
               f"--exporter.fhir.excluded_resources={','.join(EXCLUDED)}",
               f"--generate.thread_pool_size={threads}"]
        if spec.ages:
            cmd += ["-a", spec.ages]
        if spec.reference_date:
            cmd += ["-r", spec.reference_date]
        cmd.append(spec.state)
        t0 = time.monotonic()
        with (out / "generate.log").open("a") as logf:
            logf.write(f"# chunk {index}: {' '.join(cmd)}\n")
            logf.flush()
            subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, check=True)
        tmp.rename(chunk)
        seconds = time.monotonic() - t0
        (chunk / "done.json").write_text(json.dumps({"patients": n, "seed": seed,
                                                     "seconds": round(seconds, 1)}))
        log.info("chunk %d: %d patients in %.0f s", index, n, seconds)
    files = [p for d in chunk_dirs(out) for p in sorted(d.glob("*.ndjson"))]
    (out / "cohort.json").write_text(json.dumps({
        "spec": asdict(spec), "chunks": len(spec.chunks()),
        "bytes": sum(p.stat().st_size for p in files),
        "seconds_this_session": round(time.monotonic() - started, 1)}, indent=1))
    return out
