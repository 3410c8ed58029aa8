"""``m3t train`` (train, evaluate) and ``m3t export`` (ONNX, TensorRT, publish to Triton)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from m3t.console import fail as _fail

app = typer.Typer(help="Train and evaluate M3T-LM.", no_args_is_help=True)
export_app = typer.Typer(
    help="Export M3T-LM to ONNX/TensorRT and publish to model_repo/.", no_args_is_help=True
)
console = Console(stderr=True)  # stdout stays clean for --json

DATA = typer.Option(
    ..., "--data", help="Folder with dataset.npz and meta.json (`m3t features build`)."
)
RUN = typer.Option(..., "--run", help="Training run folder (`m3t train run --out`).")
AS_JSON = typer.Option(False, "--json", help="Print the result as JSON on stdout.")


def _load(data: Path):
    from trainer.data import DatasetError, load_dataset

    try:
        return load_dataset(data)
    except DatasetError as exc:
        _fail(str(exc))


def _print(result, as_json: bool, table: Table | None = None):
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    elif table is not None:
        Console().print(table)


@app.command("run")
def run(
    data: Path = DATA,
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoints, metrics, plots."),
    epochs: int = typer.Option(20, help="Maximum epochs (early stopping usually ends sooner)."),
    batch_size: int = typer.Option(64, help="Examples per step."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate (halved whenever validation stalls)."),
    patience: int = typer.Option(4, help="Epochs without validation improvement before stopping."),
    weighting: str = typer.Option(
        "uncertainty", help="Task weighting: uncertainty (Kendall 2018) or fixed."
    ),
    seed: int = typer.Option(
        0,
        help="Seed of initialisation, the examples drawn per epoch and the batch order. "
        "The split is the dataset's (`m3t features build --split-seed`).",
    ),
    examples_per_stay: int = typer.Option(
        2, help="Examples of each training stay per epoch, drawn by weight (0: every example)."
    ),
    device: str = typer.Option("auto", help="auto (GPU when present), cpu or cuda."),
    max_minutes: float = typer.Option(
        None, help="Stop after the epoch that passes this many minutes."
    ),
    threads: int = typer.Option(
        1, help="Torch CPU threads (1 is fastest on a shared 2-core host; 0: torch default)."
    ),
    bootstrap: int = typer.Option(
        200, help="Bootstrap resamples for the test-set CIs in metrics.json."
    ),
    as_json: bool = AS_JSON,
):
    """Train M3T-LM (split by patient, early stopping), then write test metrics and plots."""
    from trainer.evaluate import evaluate_run
    from trainer.report import headline
    from trainer.train import TrainConfig, train

    dataset = _load(data)
    try:
        config = TrainConfig(
            max_epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            patience=patience,
            weighting=weighting,
            seed=seed,
            examples_per_stay=examples_per_stay or None,
            device=device,
            max_minutes=max_minutes,
            threads=threads or None,
        )
    except ValueError as exc:
        _fail(str(exc))
    stays = len(set(dataset.arrays["hadm_id"].tolist()))
    console.print(f"training on {len(dataset):,} examples of {stays:,} admissions -> {out}")
    result = train(dataset, out, config, progress=True)
    metrics = evaluate_run(
        dataset,
        out,
        ablations=False,
        seeds=1,
        n_boot=bootstrap,
        device=device,
        stem="metrics",
        threads=threads or None,
    )
    summary = {
        "run": str(out),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "train_seconds": round(result.seconds, 1),
        "train_samples_per_s": round(result.samples_per_s, 1),
        "split_sizes": result.split_sizes,
        "test": headline(metrics),
    }
    console.print(
        f"best epoch {result.best_epoch}/{len(result.history)}, {result.seconds:.0f} s "
        f"({result.samples_per_s:.0f} examples/s); metrics in {out / 'metrics.md'}"
    )
    _print(summary, as_json, _table(metrics) if not as_json else None)


def _table(result: dict) -> Table:
    """Each model's headline figures at 24 h and at every event (all of them: RUN/*.md)."""
    from trainer.report import HEADLINE, cell, headline

    table = Table(
        "where", "model", *(name for name, _, _ in HEADLINE), title="held-out test (95% CI)"
    )
    for place in ("24 h", "every event"):
        for model in result["slices"].get(place, {}).get("models", {}):
            figures = headline(result, model).get(place, {})
            table.add_row(
                place,
                model,
                *(
                    cell(figures.get(key), 2 if key in ("mae", "slope") else 3)
                    for _, _, key in HEADLINE
                ),
            )
    return table


@app.command("evaluate")
def evaluate(
    data: Path = DATA,
    run_dir: Path = RUN,
    ablations: bool = typer.Option(
        True, help="Train (once, cached in RUN/ablations/) and score the ablations."
    ),
    seeds: int = typer.Option(
        3, help="M3T-LM seeds: the run's own and the next ones, cached in RUN/seeds/<seed>/."
    ),
    bootstrap: int = typer.Option(500, help="Patient-level bootstrap resamples for the 95% CIs."),
    alerts: float = typer.Option(
        5.0,
        "--alerts-per-100-patient-days",
        help="The alert threshold, set on validation patients to this many alerts.",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    workers: int = typer.Option(
        1, min=1, help="Trainings run at once, one process each (2 on a 2-core host)."
    ),
    as_json: bool = AS_JSON,
):
    """Score M3T-LM, the baselines, the ablations and further seeds on the run's test
    patients, per horizon and at every event (RUN/evaluation.md says how)."""
    from trainer.evaluate import EvaluationError, evaluate_run

    dataset = _load(data)
    if seeds < 1 or alerts <= 0:
        _fail("--seeds must be >= 1 and --alerts-per-100-patient-days > 0")
    try:
        result = evaluate_run(
            dataset,
            run_dir,
            ablations=ablations,
            seeds=seeds,
            n_boot=bootstrap,
            alerts_per_100=alerts,
            device=device,
            workers=workers,
        )
    except EvaluationError as exc:
        _fail(str(exc))
    console.print(f"table written to {run_dir / 'evaluation.md'} and {run_dir / 'evaluation.json'}")
    _print(result, as_json, _table(result))


def _checkpoint(run_dir: Path):
    from trainer.train import load_checkpoint

    path = run_dir / "best.pt"
    if not path.exists():
        _fail(f"{path} not found: train first with `m3t train run --out {run_dir}`")
    return load_checkpoint(path)


CHECKPOINT_STAMP = "checkpoint.sha256"  # beside the ONNX files: the best.pt they were exported from


def _checkpoint_digest(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "best.pt").read_bytes()).hexdigest()


def _export_onnx(run_dir: Path, out: Path, tolerance: float) -> dict:
    from trainer.export import ExportError, export_onnx

    model, checkpoint = _checkpoint(run_dir)
    try:
        report = export_onnx(model, checkpoint["input_shapes"], out, tolerance)
    except ExportError as exc:
        _fail(str(exc))
    (out / CHECKPOINT_STAMP).write_text(_checkpoint_digest(run_dir) + "\n")
    return report


def _current_onnx(run_dir: Path) -> Path:
    """RUN/onnx, exported again unless it came from the run's current best.pt: a run
    retrained in place must never publish its previous model's graphs."""
    from trainer.export import MODELS

    onnx_dir = run_dir / "onnx"
    stamp = onnx_dir / CHECKPOINT_STAMP
    stale = not stamp.exists() or stamp.read_text().strip() != _checkpoint_digest(run_dir)
    if stale or not all(
        (onnx_dir / f"{name}.onnx").exists() for name in MODELS
    ):  # or a graph added since
        _export_onnx(run_dir, onnx_dir, 1e-4)
    return onnx_dir


def _parity_table(report: dict, title: str) -> Table:
    table = Table("model", "file", "max abs diff vs PyTorch", title=title)
    for name, row in report.items():
        table.add_row(name, row["path"], f"{row['max_abs_diff']:.2e}")
    return table


@export_app.command("onnx")
def onnx(
    run_dir: Path = RUN,
    out: Path = typer.Option(None, help="Output folder (default RUN/onnx)."),
    tolerance: float = typer.Option(
        1e-4, help="Fail when ONNX Runtime differs from PyTorch by more."
    ),
    as_json: bool = AS_JSON,
):
    """Export the full model, the encoders and the fusion head to ONNX, checked by ONNX Runtime."""
    report = _export_onnx(run_dir, out or run_dir / "onnx", tolerance)
    _print(report, as_json, _parity_table(report, "ONNX parity (fp32)"))


@export_app.command("tensorrt")
def tensorrt(
    run_dir: Path = RUN,
    fp16: bool = typer.Option(True, help="Build with FP16 kernels."),
    int8: bool = typer.Option(
        False, help="Also INT8, calibrated on the run's training patients' rows (needs --data)."
    ),
    data: Path = typer.Option(None, "--data", help="Dataset for INT8 calibration."),
    tolerance: float = typer.Option(
        None, help="Parity tolerance (default 2e-2 for FP16, 0.1 with INT8)."
    ),
    as_json: bool = AS_JSON,
):
    """Build TensorRT engines from the ONNX graphs (GPU hosts with TensorRT; exit 2 elsewhere)."""
    from trainer.export import ExportError, TensorRTUnavailable, export_tensorrt, require_tensorrt

    try:
        require_tensorrt()  # before any work: most hosts cannot build engines
    except TensorRTUnavailable as exc:
        _fail(str(exc), code=2)
    model, checkpoint = _checkpoint(run_dir)
    calibration = None
    if int8:
        if data is None:
            _fail("--int8 needs --data for calibration")
        from trainer.export import ExportError, calibration_data, training_patients

        try:  # the run's training patients only: never its validation or test patients
            calibration = calibration_data(_load(data), training_patients(run_dir))
        except ExportError as exc:
            _fail(str(exc))
    onnx_dir = _current_onnx(run_dir)
    try:
        report = export_tensorrt(
            model,
            checkpoint["input_shapes"],
            onnx_dir,
            run_dir / "tensorrt",
            fp16,
            int8,
            calibration,
            tolerance if tolerance is not None else (0.1 if int8 else 2e-2),
        )
    except TensorRTUnavailable as exc:
        _fail(str(exc), code=2)
    except ExportError as exc:
        _fail(str(exc))
    _print(report, as_json, _parity_table(report, "TensorRT parity"))


@export_app.command("publish")
def publish(
    run_dir: Path = RUN,
    repo: Path = typer.Option(None, help="Triton model repository (default: settings.model_repo)."),
    backend: str = typer.Option(
        "python", help="python (CPU Triton), onnxruntime or tensorrt (GPU Triton)."
    ),
    max_batch_size: int = typer.Option(256, help="Triton max_batch_size."),
    preferred_batch_size: list[int] = typer.Option(
        [64, 256], help="Dynamic batching preferred sizes."
    ),
    queue_delay_us: int = typer.Option(0, help="Dynamic batching max_queue_delay_microseconds."),
    instances: int = typer.Option(1, help="Model instances (instance_group count)."),
    load: bool = typer.Option(
        False, help="Then ask the running Triton (settings.triton) to load the new versions."
    ),
    as_json: bool = AS_JSON,
):
    """Publish the run as a new version of m3t_lm and of each encoder and the fusion head."""
    from m3t.settings import get_settings
    from trainer.export import FULL_MODEL, graphs
    from trainer.model_card import build_card
    from trainer.publish import BACKENDS, Batching, PublishError, load_in_triton
    from trainer.publish import publish as publish_graphs

    if backend not in BACKENDS:
        _fail(f"--backend must be one of {', '.join(BACKENDS)}")
    settings = get_settings()
    model, checkpoint = _checkpoint(run_dir)
    onnx_dir = _current_onnx(run_dir)
    engine_dir = run_dir / "tensorrt" if backend == "tensorrt" else None
    try:
        batching = Batching(max_batch_size, tuple(preferred_batch_size), queue_delay_us, instances)
        published = publish_graphs(
            graphs(model, checkpoint["input_shapes"]),
            onnx_dir,
            repo or settings.model_repo,
            backend,
            batching,
            engine_dir,
            provenance={"run": str(run_dir.resolve()), "epoch": checkpoint["epoch"]},
            card=build_card(run_dir, checkpoint, FULL_MODEL),
        )
        if load:
            load_in_triton(settings, tuple(published))
    except (PublishError, ValueError) as exc:
        _fail(str(exc))
    _print_published(published, f"published ({backend} backend)", "version folder", as_json)


def _print_published(published: dict[str, Path], title: str, column: str, as_json: bool) -> None:
    result = {name: str(path) for name, path in published.items()}
    table = Table("model", column, title=title)
    for name, path in result.items():
        table.add_row(name, path)
    _print(result, as_json, table)


@export_app.command("configs")
def configs(
    n_features: int = typer.Option(..., help="Length F of the numeric vector (the feature set's)."),
    repo: Path = typer.Option(None, help="Triton model repository (default: settings.model_repo)."),
    backend: str = typer.Option("python", help="python, onnxruntime or tensorrt."),
):
    """Write the seven models' config.pbtxt (default architecture) without publishing a version.

    The seven: m3t_lm, m3t_enc_numeric, m3t_enc_notes, m3t_enc_cxr, m3t_fusion, m3t_rescore
    and m3t_explain.
    """
    from features import model_inputs as mi
    from m3t.settings import get_settings
    from trainer.export import graphs
    from trainer.model import M3TLM, M3TConfig
    from trainer.publish import Batching, PublishError, write_config

    model = M3TLM(M3TConfig(n_features=n_features, vocab_size=2))
    shapes = {spec.name: spec.shape for spec in mi.input_specs(n_features)}
    try:
        for graph in graphs(model, shapes).values():
            console.print(
                str(write_config(repo or get_settings().model_repo, graph, backend, Batching()))
            )
    except (PublishError, ValueError) as exc:
        _fail(str(exc))


@export_app.command("dali")
def dali(
    repo: Path = typer.Option(None, help="Triton model repository (default: settings.model_repo)."),
    device: str = typer.Option(
        "auto", help="gpu (nvJPEG decode; needs CUDA here too), cpu, or auto."
    ),
    max_batch_size: int = typer.Option(
        256, help="Triton max_batch_size, and the pipeline's batch size."
    ),
    instances: int = typer.Option(1, help="Model instances (instance_group count)."),
    as_json: bool = AS_JSON,
):
    """Publish the chest X-ray DALI pipeline for Triton, and the bytes -> embedding ensemble."""
    from features.cxr import gpu_available
    from m3t.settings import get_settings
    from trainer.publish import Batching, PublishError, publish_cxr_pipeline

    if device not in ("auto", "cpu", "gpu"):
        _fail("--device must be auto, cpu or gpu")
    if device == "auto":
        device = "gpu" if gpu_available() else "cpu"
    elif device == "gpu" and not gpu_available():
        _fail(
            "--device gpu: no CUDA device here, and DALI serializes a GPU pipeline "
            "only where there is one "
            "(run this on the GPU host, or use --device cpu for the DALI backend's CPU mode)",
            code=2,
        )
    try:
        defaults = Batching()
        batching = Batching(
            max_batch_size,
            tuple(b for b in defaults.preferred_batch_size if b <= max_batch_size),
            defaults.max_queue_delay_microseconds,
            instances,
        )
        published = publish_cxr_pipeline(repo or get_settings().model_repo, device, batching)
    except (PublishError, ValueError) as exc:
        _fail(str(exc))
    _print_published(
        published, f"chest X-ray pipeline for Triton's DALI backend ({device})", "written", as_json
    )


@app.command("protocol")
def protocol(
    mimic: Path = typer.Option(
        ..., exists=True, file_okay=False, help="MIMIC-IV (holds hosp/ and icu/)."
    ),
    note: Path = typer.Option(
        None, exists=True, file_okay=False, help="MIMIC-IV-Note (holds note/)."
    ),
    cxr: Path = typer.Option(
        None, exists=True, file_okay=False, help="MIMIC-CXR-JPG (metadata table and files/)."
    ),
    out: Path = typer.Option(..., "--out", file_okay=False, help="Where everything goes."),
    min_age: float = typer.Option(18.0, help="Cohort: adults from this age at admission."),
    require_cxr: bool = typer.Option(
        False, help="Cohort: only stays with a chest X-ray during the stay."
    ),
    epochs: int = typer.Option(20, help="Maximum epochs of each training."),
    seeds: int = typer.Option(3, help="M3T-LM trainings, one per seed, in the evaluation."),
    bootstrap: int = typer.Option(500, help="Patient-level bootstrap resamples."),
    workers: int = typer.Option(1, min=1, help="Trainings run at once, one process each."),
    as_json: bool = AS_JSON,
):
    """The paper's protocol on a MIMIC-IV copy: cohort, dataset, training, evaluation."""
    from trainer.protocol import Cohort, ProtocolError, Sources, run
    from trainer.train import TrainConfig

    try:
        summary = run(
            Sources(mimic, note, cxr),
            out,
            Cohort(min_age, require_cxr),
            TrainConfig(max_epochs=epochs),
            seeds=seeds,
            n_boot=bootstrap,
            workers=workers,
        )
    except ProtocolError as exc:
        _fail(str(exc))
    console.print(f"protocol written to {out / 'protocol.json'}; table in {summary['evaluation']}")
    _print(summary, as_json)
