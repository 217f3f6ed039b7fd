"""The modality model on realistic flat data, end to end: a multi-label modality router and
specialists on every image naming their modality train, predict and report (confusion CSV/PNG,
accuracy per category in the log, the ablation's secondary score per category)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from cli_helpers import invoke, train
from conceptclef.router import ModalityRouter
from conceptclef.router.modality_cuis import ModalityCuiRouter

MODALITY = ("--set", 'categories.modality_model="cuis"', "--set", 'categories.specialist_images="modality"')


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

    output = invoke("ablation", "--run", run, "--images", realistic_flat / "test", "--gt", realistic_flat / "test_concepts.csv",
                    "--categories", realistic_flat / "test_categories.csv", "--out", tmp_path / "report")
    assert "Secondary score per category" in output and "oracle routing" in output
    secondary = pd.read_csv(tmp_path / "report" / "ablation_secondary.csv")
    categories = sorted(set(pd.read_csv(realistic_flat / "test_categories.csv")["CATEGORY"]))
    assert list(secondary.columns) == ["system", "secondary", "n_images", *categories]
    overall = pd.read_csv(tmp_path / "report" / "ablation.csv").set_index("system")["secondary"]
    assert secondary.set_index("system")["secondary"].to_dict() == pytest.approx(overall.to_dict(), abs=1e-4)
