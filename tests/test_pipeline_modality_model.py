"""The modality model on realistic flat data, end to end: a multi-label modality router and
specialists on every image naming their modality train, predict and report (confusion CSV/PNG,
accuracy per category in the log, the ablation's secondary score per category)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cli_helpers import invoke, train
from conceptclef.core.runfiles import load_sparse
from conceptclef.pipeline.run.output_paths import probabilities_path_for
from conceptclef.router import ModalityRouter
from conceptclef.router.modality_cuis import ModalityCuiRouter

MODALITY = ("--set", 'categories.modality_model="cuis"', "--set", 'categories.specialist_images="modality"',
            "--set", "ensemble.modality_features=true", "--set", 'ensemble.modality_rule="on"')


@pytest.fixture(scope="module")
def realistic_flat(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("realistic") / "DATA"
    invoke("make-demo", data, "--layout", "flat2025", "--train", 150, "--valid", 70, "--test", 30, "--seed", 4,
           "--image-size", 48, "--fused-share", 0.6, "--composite-share", 0.15)
    return data


def test_modality_router_and_reports_on_realistic_flat_data(realistic_flat: Path, tmp_path: Path, caplog) -> None:
    torch.set_num_threads(1)
    run = tmp_path / "run"
    with caplog.at_level("INFO", logger="conceptclef"):
        train(realistic_flat, run, *MODALITY)
    assert "router: one sigmoid per modality CUI" in caplog.text
    assert "router: validation accuracy per category: DRAN" in caplog.text
    router = ModalityRouter.load(run / "router", device="cpu")
    manifest = json.loads((run / "manifest.json").read_text())
    assert isinstance(router, ModalityCuiRouter) and router.categories_ == manifest["categories"]
    confusion = pd.read_csv(run / "router" / "confusion.csv", index_col=0)
    assert list(confusion.index) == manifest["categories"] and list(confusion.columns) == [*manifest["categories"], "accuracy"]
    matrix = confusion[manifest["categories"]].to_numpy()
    assert confusion["accuracy"].fillna(0).between(0, 1).all() and (run / "router" / "confusion.png").stat().st_size > 1000
    assert matrix.trace() / matrix.sum() == pytest.approx(json.loads((run / "router" / "baseline.json").read_text())["model"], abs=1e-6)
    # PET specialists learn from every image naming PET: more images than the derived DRPE category holds
    record = json.loads((run / "categories.json").read_text())
    if "DRPE" in manifest["categories"] and "DRPE" not in manifest["fallback_categories"]:
        names_pet = sum("C0032743" in line for line in (realistic_flat / "train_concepts.csv").read_text().splitlines())
        assert names_pet > record["images"]["train"]["DRPE"]

    # the stacker saw the modality features; validation counted label sets naming no modality or several
    assert json.loads((run / "ensemble" / "stacker.json").read_text())["feature_names"][-3:] == [
        "modality_alone_prob", "modality_named_prob", "modality_rank"]
    record = json.loads((run / "ensemble" / "ensemble.json").read_text())
    assert record["modality_rule"] == "on" and record["modality"]["errors_without"]["truth_one"] > 0
    assert "the one-modality rule changes F1" in caplog.text
    submission = tmp_path / "submission.csv"
    invoke("predict", "--run", run, "--images", realistic_flat / "test", "--out", submission, "--format", "2025")
    _, saved = load_sparse(probabilities_path_for(submission))
    routed = dict(zip(saved["image_ids"], saved["router_categories"][np.argmax(saved["router_probs"], axis=1)]))
    predicted = pd.read_csv(submission)
    modality_cuis = {"C0002978", "C0040405", "C0024485", "C0032743", "C0041618", "C1306645"}
    for image_id, cuis in zip(predicted.iloc[:, 0], predicted.iloc[:, 1].fillna("")):
        if routed[image_id] != "DRCO":  # one modality unless the router calls the image combined
            assert len(modality_cuis.intersection(str(cuis).split(";"))) <= 1, (image_id, cuis)

    output = invoke("ablation", "--run", run, "--images", realistic_flat / "test", "--gt", realistic_flat / "test_concepts.csv",
                    "--categories", realistic_flat / "test_categories.csv", "--out", tmp_path / "report")
    assert "Secondary score per category" in output and "oracle routing" in output
    tested = pd.read_csv(tmp_path / "report" / "router_confusion.csv", index_col=0)
    assert list(tested.columns)[-1] == "accuracy" and tested.drop(columns="accuracy").to_numpy().sum() == 30
    secondary = pd.read_csv(tmp_path / "report" / "ablation_secondary.csv")
    categories = sorted(set(pd.read_csv(realistic_flat / "test_categories.csv")["CATEGORY"]))
    assert list(secondary.columns) == ["system", "secondary", "n_images", *categories]
    overall = pd.read_csv(tmp_path / "report" / "ablation.csv").set_index("system")["secondary"]
    assert secondary.set_index("system")["secondary"].to_dict() == pytest.approx(overall.to_dict(), abs=1e-4)
