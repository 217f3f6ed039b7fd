"""How the CUI router's test routing depends on the bar for a second modality (tau).

The multi-label modality router (router.modality_cuis) reads an image's category from its CUI
probabilities; an image is combined when two or more are likely. Rescaling each probability so
that `tau` maps to 0.5 raises (tau > 0.5) or lowers the bar for a second modality. Prints the
routing accuracy against the true categories of a demo's test images for several tau:

    .venv/bin/python benchmarks/cui_router_threshold.py RUN DATA

RUN: a finished flat run trained with `categories.modality_model = "cuis"`; DATA: its demo data
(test/ and test_categories.csv).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from conceptclef.pipeline.image_sets import load_unlabelled_set
from conceptclef.pipeline.run.directory import load_run_config
from conceptclef.pipeline.run.layout import RunLayout
from conceptclef.router import ModalityRouter
from conceptclef.router.modality_cuis import ModalityCuiRouter
from conceptclef.training.feature_registry import feature_store_for

TAUS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("data", type=Path)
    args = parser.parse_args()
    config = load_run_config(RunLayout(args.run))
    router = ModalityRouter.load(args.run / "router", "cpu", feature_store_for(config.data))
    if not isinstance(router, ModalityCuiRouter):
        raise SystemExit(f"{args.run / 'router'}: not a CUI router (categories.modality_model = \"cuis\")")
    images, _ = load_unlabelled_set(args.data / "test", config, args.data / ".cache")
    truth = pd.read_csv(args.data / "test_categories.csv").set_index("ID")["CATEGORY"]
    true = np.array([truth[image_id] for image_id in images.image_ids])
    probs = np.clip(router.predict_cui_proba(images.images).astype(np.float64), 1e-6, 1 - 1e-6)
    for tau in TAUS:
        shifted = 1 / (1 + np.exp(-(np.log(probs / (1 - probs)) - np.log(tau / (1 - tau)))))
        routed = np.array(router.categories_)[np.argmax(router.categories_from(shifted), axis=1)]
        per_category = ", ".join(f"{c} {np.mean(routed[true == c] == c):.3f}" for c in sorted(set(true)))
        print(f"tau {tau:.2f}: accuracy {np.mean(routed == true):.3f} ({per_category})")


if __name__ == "__main__":
    main()
