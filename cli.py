"""conceptclef command line: parses arguments and calls the pipeline; nothing else lives here."""

from __future__ import annotations

import functools
import json
import logging
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.callback()
def main(quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors.")) -> None:
    """conceptclef: label radiology images with UMLS concepts (ImageCLEFmed concept detection)."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def _user_errors(command: Callable) -> Callable:
    """Show bad input as one clear line (file:line: problem) and exit 2, not as a traceback.

    A filesystem failure (read-only folder, disk full) is one line naming the file, exit 1; SIGTERM
    ends the command through its clean-up code (exit 143), so it can be resumed.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from conceptclef.core.termination import Terminated, sigterm_raises
        from conceptclef.pipeline.errors import USER_ERRORS

        try:
            with sigterm_raises():
                return command(*args, **kwargs)
        except USER_ERRORS as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(code=2) from None
        except Terminated:
            typer.echo("error: stopped by SIGTERM; the finished files are kept: rerun the same command to resume", err=True)
            raise typer.Exit(code=Terminated.exit_code) from None
        except OSError as error:
            where = f"{error.filename}: " if error.filename else ""
            typer.echo(f"error: {where}{error.strerror or error}", err=True)
            raise typer.Exit(code=1) from None

    return wrapper


@app.command("make-demo")
@_user_errors
def make_demo(
    out: Path = typer.Argument(..., help="Folder to write the synthetic dataset into."),
    train: int = typer.Option(700, help="Training images."),
    valid: int = typer.Option(350, help="Validation images."),
    test: int = typer.Option(250, help="Test images (flat folder; truth in test_concepts.csv)."),
    seed: int = typer.Option(0, help="Random seed."),
    image_size: int = typer.Option(128, help="Side of the written JPEG images."),
    layout: str = typer.Option(
        "folders2020",
        help="folders2020 (category folders, 2020 TSV), flat2025 (flat folders, ID,CUIs files) or "
        "flat2026 (flat, one concepts file for train and valid, cui_mapping.csv).",
    ),
    realistic: Optional[bool] = typer.Option(
        None,
        "--realistic/--plain",
        help="Realistic labels (fused PET/CT, images without modality CUI, two-modality composites) or the "
        "plain story. Default: realistic for the flat layouts, plain for folders2020; give --realistic with "
        "folders2020 to get the flat layouts' images in category folders.",
    ),
    fused_share: Optional[float] = typer.Option(None, help="Share of PET images also labelled CT (realistic: 0.5)."),
    no_modality_share: Optional[float] = typer.Option(None, help="Share of images without modality CUI (realistic: 0.1)."),
    composite_share: Optional[float] = typer.Option(None, help="Share of two-modality composite figures, filed DRCO (realistic: 0.08)."),
) -> None:
    """Write a synthetic radiology-like dataset (same images in every --layout for the same seed and shares)."""
    import dataclasses

    from conceptclef.data.demo import DemoShares, make_demo_dataset

    shares = DemoShares.for_layout(layout) if realistic is None else (DemoShares.realistic() if realistic else DemoShares())
    given = {"fused_pet_ct": fused_share, "no_modality": no_modality_share, "composite": composite_share}
    shares = dataclasses.replace(shares, **{name: value for name, value in given.items() if value is not None})
    summary = make_demo_dataset(
        out, n_train=train, n_valid=valid, n_test=test, seed=seed, image_size=image_size, layout=layout, shares=shares
    )
    typer.echo(json.dumps(summary, indent=2))


@app.command("train-all")
@_user_errors
def train_all(
    data: Path = typer.Option(..., help="Dataset folder (train/, valid/, *_concepts.csv)."),
    out: Path = typer.Option(..., help="Run directory; rerunning resumes it."),
    config: Optional[Path] = typer.Option(None, help="TOML config (see configs/)."),
    only: Optional[str] = typer.Option(None, help="Comma-separated networks (router, global, global-<NAME> of an extra global model, a category) and ensemble."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value: section.key=value."),
    devices: Optional[str] = typer.Option(
        None,
        help="Train the base models side by side, one worker process per device: cuda:0,cuda:1,... "
        "or auto (every visible GPU) or cpu,cpu. Default: one after the other in this process.",
    ),
) -> None:
    """Train the router, the global and per-category models, then fit the stacker and thresholds."""
    from conceptclef.pipeline.devices.workers import parse_devices
    from conceptclef.pipeline.stages.train_all import train_all as run_train_all
    from conceptclef.training import distributed

    stages = [stage.strip() for stage in only.split(",") if stage.strip()] if only else None
    # Checked before joining a torchrun group: --devices and torchrun exclude each other.
    device_list = parse_devices(devices) if devices is not None else None
    # Under torchrun (WORLD_SIZE > 1) every rank runs this; see docs/DISTRIBUTED.md.
    if distributed.init_if_launched(timeout=timedelta(hours=4)) and not distributed.is_main_process():
        logging.getLogger().setLevel(logging.WARNING)
    try:
        run_train_all(data_dir=data, run_dir=out, config_path=config, only=stages, overrides=set_, devices=device_list)
    finally:
        distributed.destroy()


@app.command("predict")
@_user_errors
def predict(
    run: Path = typer.Option(..., help="Run directory made by train-all."),
    images: Path = typer.Option(..., help="Folder of test images."),
    out: Path = typer.Option(..., help="Submission file to write."),
    format: str = typer.Option("2020", help="Submission format: 2020 (ID<TAB>CUI;CUI) or 2025 (ID,CUIs); 2026 is the 2025 format."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file that predict did not write."),
    zip_: bool = typer.Option(
        False, "--zip", help="With --format 2025: also write OUT with .zip, holding only submission.csv (the upload)."
    ),
) -> None:
    """Write a challenge submission (and per-image probabilities beside it) using only RUN."""
    from conceptclef.pipeline.stages.predict import predict_submission

    summary = predict_submission(run_dir=run, images_dir=images, out_path=out, submission_format=format, upload_zip=zip_, overwrite=overwrite)
    typer.echo(json.dumps(summary, indent=2))


@app.command("evaluate")
@_user_errors
def evaluate(
    submission: Path = typer.Argument(..., help="Submission file (2020 TSV, 2022 ID|CUIs or 2025 CSV)."),
    ground_truth: Path = typer.Argument(..., help="Ground-truth concept file."),
    subset: Optional[Path] = typer.Option(
        None, help="File of CUIs replacing the built-in 2025/2026 secondary list for the secondary score."
    ),
    secondary_gt: Optional[Path] = typer.Option(
        None, "--secondary-gt", help="Ground truth of the secondary score (2025/2026: concepts_manual.csv); default GROUND_TRUTH."
    ),
    categories: Optional[Path] = typer.Option(
        None, help="Per-category breakdown: a CSV of ID,CATEGORY or an image folder with category subfolders."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object."),
) -> None:
    """Score a submission with the official primary and secondary sample-averaged F1."""
    from conceptclef.pipeline.stages.evaluate import evaluate_submission

    report = evaluate_submission(
        submission, ground_truth, subset_path=subset, categories_path=categories, secondary_truth_path=secondary_gt
    )
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    typer.echo(f"F1 {report.score:.4f} over {report.n_images} images")
    secondary = report.secondary
    if secondary.n_images == 0:  # an F1 over no image is no score, not 0.0
        typer.echo(
            f"secondary F1 n/a: no image of the ground truth has one of the {len(report.secondary_concepts)} CUIs "
            f"({report.secondary_source})"
        )
    else:
        typer.echo(
            f"secondary F1 {secondary.score:.4f} over {secondary.n_images} images "
            f"({len(report.secondary_concepts)} CUIs: {report.secondary_source})"
        )
    for name, (score, count) in report.per_category.items():
        second, second_count = secondary.per_category.get(name, (float("nan"), 0))
        typer.echo(f"  {name:<10} {score:.4f}  ({count} images)  secondary {second:.4f} ({second_count} images)")


@app.command("validate")
@_user_errors
def validate(
    submission: Path = typer.Argument(..., help="Submission file, or the 2025/2026 upload .zip."),
    images: Path = typer.Option(..., help="Folder of the test images the submission must cover."),
    format: Optional[str] = typer.Option(None, help="2020, 2022, 2025 or 2026 (the 2025/2026 checker); guessed from the file when omitted."),
) -> None:
    """Check a submission against the official rules of its format; exit non-zero when it breaks one."""
    from conceptclef.pipeline.stages.evaluate import validate_submission_file

    count = validate_submission_file(submission, images, submission_format=format)
    typer.echo(f"{submission}: valid ({count} images)")


@app.command("ablation")
@_user_errors
def ablation(
    run: Path = typer.Option(..., help="Run directory made by train-all."),
    out: Path = typer.Option(..., help="Report folder (CSV, Markdown, PNG plots)."),
    images: Optional[Path] = typer.Option(None, help="Labelled image folder; omit for out-of-fold validation figures."),
    gt: Optional[Path] = typer.Option(None, help="Ground-truth concept file for --images."),
    categories: Optional[Path] = typer.Option(None, help="True categories for oracle routing (CSV ID,CATEGORY)."),
    cui_names: Optional[Path] = typer.Option(
        None, help="CSV of CUI,name for the per-concept report; default: cui_mapping.csv of the run's data folder, if any."
    ),
) -> None:
    """Score global vs per-category vs stacked ensemble (primary and secondary F1), and every concept by frequency band."""
    from conceptclef.pipeline.stages.ablation import run_ablation

    table = run_ablation(
        run_dir=run, out_dir=out, images_dir=images, truth_path=gt, categories_path=categories, cui_names_path=cui_names
    )
    typer.echo(table)


if __name__ == "__main__":
    sys.exit(app())
