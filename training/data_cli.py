"""`build` (datasets from FHIR) and `annotate` (teacher rationales) as click commands, for
`clinragen-train` to mount (`group.add_command(build)`, `group.add_command(annotate)`);
`build_main(argv)` runs `build` on its own."""

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
@click.option("--visit-lab-hours", default=0.0, show_default=True,
              help="Also use labs up to this many hours after the index time (0 = strict).")
@click.option("--quiet", is_flag=True)
def build(sources: tuple[str, ...], fhir_url: str | None, patients: tuple[str, ...],
          out_dir: Path, seed: int, window_days: int, lookback_days: int, leak_policy: str,
          mask_scope: str, no_ancestors: bool, max_onset: int, random_per_patient: int,
          max_patients: int | None, visit_lab_hours: float, quiet: bool) -> None:
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
                      random_per_patient=random_per_patient, max_patients=max_patients,
                      visit_lab_hours=visit_lab_hours)
    manifest = build_dataset(srcs, out_dir, config=cfg, progress=not quiet)
    summary = {"out": str(out_dir), "counts": manifest.counts, "leakage": manifest.leakage,
               "index_kinds": manifest.index_kinds, "build_seconds": manifest.build_seconds}
    click.echo(json.dumps(summary, indent=2))


@click.command("annotate")
@click.option("--data", "data_dir", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Write here instead of rewriting --data in place.")
@click.option("--teacher", type=click.Choice(["knowledge", "llm"]), default="knowledge",
              show_default=True)
@click.option("--llm-url", default=None, help="OpenAI-compatible base URL, e.g. .../v1")
@click.option("--llm-model", default=None)
@click.option("--api-key-env", default="OPENAI_API_KEY", show_default=True,
              help="Name of the env var holding the key (the key itself is never an option).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="LLM answer cache (default: DATA/.llm-cache).")
@click.option("--concurrency", default=4, show_default=True)
@click.option("--rate", "rate_per_s", default=2.0, show_default=True, help="Requests/s.")
@click.option("--quiet", is_flag=True)
def annotate(data_dir: Path, out_dir: Path | None, teacher: str, llm_url: str | None,
             llm_model: str | None, api_key_env: str, cache_dir: Path | None, concurrency: int,
             rate_per_s: float, quiet: bool) -> None:
    """Write teacher rationales (notes, labs, multimodal, diagnosis) into a built dataset."""
    from clinragen_fhir.knowledge import load_graph
    from training.annotate import annotate_dataset
    from training.llm import LLMClient, LLMConfig
    from training.teacher import KnowledgeTeacher, LLMTeacher

    kg = load_graph()
    if teacher == "knowledge":
        report = annotate_dataset(data_dir, KnowledgeTeacher(kg), out_dir, progress=not quiet)
    else:
        if not llm_url or not llm_model:
            raise click.UsageError("--teacher llm needs --llm-url and --llm-model")
        cfg = LLMConfig(base_url=llm_url, model=llm_model, api_key_env=api_key_env,
                        concurrency=concurrency, rate_per_s=rate_per_s,
                        cache_dir=cache_dir or data_dir / ".llm-cache")
        with LLMClient(cfg) as client:
            report = annotate_dataset(data_dir, LLMTeacher(client, kg), out_dir,
                                      progress=not quiet)
    click.echo(json.dumps(report.to_json(), indent=2))


def build_main(argv: Sequence[str] | None = None) -> None:
    """Run `build` alone: `build_main(["--source", DIR, "--out", OUT])`."""
    build.main(args=list(argv) if argv is not None else None, standalone_mode=True)


main = click.Group("data", commands=[build, annotate],
                   help="Datasets from FHIR and teacher rationales.")

if __name__ == "__main__":
    main()
