"""`build` (datasets from FHIR) and `annotate` (teacher rationales) as click commands, for
`clinragen-train` to mount; `build_main(argv)` runs `build` on its own."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import click

from training.data import BuildConfig, Source, build_dataset, source_from_spec


@click.command("build")
@click.option("--source", "sources", multiple=True, metavar="[NAME=]PATH",
              help="Bundle file/folder (.json, .json.gz) or Bulk Data NDJSON folder; repeatable.")
@click.option("--fhir-url", default=None, help="Read patients from this FHIR server instead.")
@click.option("--patient", "patients", multiple=True, help="With --fhir-url: only these ids.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--window-days", default=365, show_default=True)
@click.option("--lookback-days", default=3 * 365, show_default=True)
@click.option("--leak-policy", type=click.Choice(["mask", "drop"]), default="mask",
              show_default=True)
@click.option("--mask-scope", type=click.Choice(["unknown", "labels"]), default="unknown",
              show_default=True)
@click.option("--no-ancestors", is_flag=True, help="Label only the recorded disorders.")
@click.option("--max-onset", default=6, show_default=True, help="Onset index times/patient.")
@click.option("--random-per-patient", default=1, show_default=True)
@click.option("--max-patients", type=int, default=None, help="First N patients per source.")
@click.option("--quiet", is_flag=True)
def build(sources: tuple[str, ...], fhir_url: str | None, patients: tuple[str, ...],
          out_dir: Path, seed: int, window_days: int, lookback_days: int, leak_policy: str,
          mask_scope: str, no_ancestors: bool, max_onset: int, random_per_patient: int,
          max_patients: int | None, quiet: bool) -> None:
    """Build train/valid/test JSONL examples and manifest.json from FHIR data."""
    srcs: list[Source] = [source_from_spec(s) for s in sources]
    if fhir_url:
        from clinragen_fhir.config import FhirEndpoint

        client = FhirEndpoint(base_url=fhir_url).client()
        srcs.append(Source("fhir", "fhir", client=client,
                           patient_ids=list(patients) or None))
    if not srcs:
        raise click.UsageError("give at least one --source or --fhir-url")
    cfg = BuildConfig(window_days=window_days, lookback_days=lookback_days, seed=seed,
                      include_ancestors=not no_ancestors, leak_policy=leak_policy,
                      mask_scope=mask_scope, max_onset_per_patient=max_onset,
                      random_per_patient=random_per_patient, max_patients=max_patients)
    manifest = build_dataset(srcs, out_dir, config=cfg, progress=not quiet)
    summary = {"out": str(out_dir), "counts": manifest.counts, "leakage": manifest.leakage,
               "index_kinds": manifest.index_kinds, "build_seconds": manifest.build_seconds}
    click.echo(json.dumps(summary, indent=2))


def build_main(argv: Sequence[str] | None = None) -> None:
    """Entry point: `python -m training.data_cli --source DIR --out OUT`."""
    build.main(args=list(argv) if argv is not None else None, standalone_mode=True)


if __name__ == "__main__":
    build_main()
