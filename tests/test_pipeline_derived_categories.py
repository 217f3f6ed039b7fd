"""The routed ensemble on flat data (ImageCLEF 2021-2026): categories derived from the modality
CUIs train a router and per-category models, predict routes test images with the router, and the
ablation groups the test images by the categories derived from their ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import invoke, run_cli, train
from conceptclef.data.concepts import read_category_file
from conceptclef.data.modalities import UNROUTED

MODALITY_CUIS = {"C0002978", "C0040405", "C0024485", "C0032743", "C0041618", "C1306645"}


def strip_modalities(concept_file: Path, rows: int) -> list[str]:
    """Remove the modality CUIs of the first `rows` images (a labelling gap real data can have)."""
    lines = concept_file.read_text().splitlines()
    stripped = []
    for index in range(1, rows + 1):
        image_id, cuis = lines[index].split(",")
        kept = [cui for cui in cuis.split(";") if cui not in MODALITY_CUIS] or ["C0030705"]
        lines[index] = f"{image_id},{';'.join(kept)}"
        stripped.append(image_id)
    concept_file.write_text("\n".join(lines) + "\n")
    return stripped


@pytest.mark.slow
def test_router_and_category_models_from_labels_on_flat_data(tmp_path: Path):
    data, run = tmp_path / "DATA", tmp_path / "run"
    invoke("make-demo", data, "--layout", "flat2025", "--plain", "--train", 160, "--valid", 80, "--test", 40, "--seed", 3, "--image-size", 48)
    assert not any(path.is_dir() for path in (data / "train").iterdir())  # no category folders
    strip_modalities(data / "train_concepts.csv", 3)
    strip_modalities(data / "valid_concepts.csv", 2)
    train(data, run)

    manifest = json.loads((run / "manifest.json").read_text())
    record = json.loads((run / "categories.json").read_text())
    assert record["source"] == "modality CUIs" and record["images"]["train"][UNROUTED] == 3
    assert manifest["categories"] == sorted(set(record["images"]["train"]) - {UNROUTED})
    assert len(manifest["categories"]) == 7  # the six modalities and DRCO (PET + CT)
    # A router CNN was trained over the derived categories, on the routable images only.
    confusion = json.loads((run / "router" / "confusion.json").read_text())
    assert (run / "router" / "checkpoint.pt").is_file() and confusion["categories"] == manifest["categories"]
    assert sum(map(sum, confusion["matrix"])) == 80 - 2
    trained = [category for category in manifest["categories"] if (run / f"category-{category}" / "checkpoint.pt").is_file()]
    assert len(trained) >= 3 and set(trained) == set(manifest["categories"]) - set(manifest["fallback_categories"])

    submission = tmp_path / "submission.csv"
    invoke("predict", "--run", run, "--images", data / "test", "--out", submission, "--format", "2025")
    invoke("validate", submission, "--images", data / "test")
    report = json.loads(invoke("evaluate", submission, data / "test_concepts.csv", "--json"))
    assert report["n_images"] == 40 and report["score"] > 0.2

    # No --categories: the true categories come from the test truth's modality CUIs.
    output = invoke("ablation", "--run", run, "--images", data / "test", "--gt", data / "test_concepts.csv", "--out", tmp_path / "report")
    assert "grouped by true category" in output and "oracle routing" in output
    header = next(line for line in output.splitlines() if line.startswith("| system"))
    true_categories = set(read_category_file(data / "test_categories.csv").values())
    assert [name.strip() for name in header.split("|")[1:-1] if name.strip() not in ("system", "overall", "secondary", "n_images")] == sorted(true_categories)

    # Another grouping is another run: resuming this one with it is refused before any work.
    refused = run_cli("train-all", "--data", data, "--out", run, "--set", 'categories.several=""')
    assert refused.exit_code == 2 and "differs from the config" in refused.output
