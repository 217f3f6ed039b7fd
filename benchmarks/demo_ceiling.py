"""The demo's ceiling: the official F1 that a model seeing everything the pixels show could expect.

About a third of the demo's concept occurrences are invisible by design (caption-only and rare
CUIs) and listing is random, so no system reaches 1.0; this tells how far the base networks and
the ensemble are from what the data allows, on a make-demo split.

    .venv/bin/python benchmarks/demo_ceiling.py demo/data [--split test]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from conceptclef.core.runfiles import read_json
from conceptclef.data.concepts import read_concept_file
from conceptclef.data.demo import DEMO_MARKER, named_for_layout, rare_pool, sample_demo_images, visible_concept_probabilities
from conceptclef.data.errors import DataError
from conceptclef.data.vocabulary import ConceptVocabulary
from conceptclef.ensemble.decoding import ExpectedF1Decoder
from conceptclef.ensemble.thresholds import tune_global_threshold
from conceptclef.scoring.f1 import mean_sample_f1_sparse


def demo_ceiling(out: Path | str, split: str = "test") -> dict[str, float]:
    """The official F1 a perfect-sighted model could expect on a written demo split.

    Re-draws the images' stories from the seed and sizes in demo.json (checking them against the
    concept file, so a hand-edited folder is refused) and scores the expected-F1 decoding of
    `visible_concept_probabilities`, plus the best single threshold on them (tuned on the split
    itself: an oracle too). Expected-F1 decoding is close to, not exactly, the optimal rule, so
    read the larger of the two as the ceiling.
    """
    out = Path(out)
    summary = read_json(out / DEMO_MARKER)
    sizes = {name: int(summary["splits"][name]["images"]) for name in ("train", "valid", "test")}
    splits = sample_demo_images(sizes["train"], sizes["valid"], sizes["test"], np.random.default_rng(int(summary["seed"])))
    images = named_for_layout(splits, str(summary.get("layout", "folders2020")))[split]
    written = read_concept_file(out / f"{split}_concepts.csv")
    if {image.image_id: list(image.cuis) for image in images} != written:
        raise DataError(out / f"{split}_concepts.csv", "does not match the demo.json it was written with")
    rare = rare_pool(sum(sizes.values()))
    probabilities = [visible_concept_probabilities(image, rare) for image in images]
    vocabulary = ConceptVocabulary(sorted({cui for row in probabilities for cui in row} | {cui for image in images for cui in image.cuis}))
    rows = np.repeat(np.arange(len(images)), [len(row) for row in probabilities])
    columns = [vocabulary.index_of(cui) for row in probabilities for cui in row]
    values = [value for row in probabilities for value in row.values()]
    scores = sp.csr_matrix((values, (rows, columns)), shape=(len(images), len(vocabulary)))
    truth = vocabulary.encode([list(image.cuis) for image in images])
    threshold, threshold_f1 = tune_global_threshold(scores, truth, None)
    return {
        "expected_f1_decoding": mean_sample_f1_sparse(ExpectedF1Decoder(1, 100).predict(scores), truth),
        "best_single_threshold": float(threshold_f1),
        "threshold": float(threshold),
        "images": len(images),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, nargs="?", default=Path("demo/data"))
    parser.add_argument("--split", choices=("train", "valid", "test"), default="test")
    args = parser.parse_args()
    ceiling = demo_ceiling(args.data, args.split)
    print(f"{args.data} {args.split}: {ceiling['images']} images")
    print(f"  ceiling, expected-F1 decoding of the true visible-concept probabilities: {ceiling['expected_f1_decoding']:.4f}")
    print(f"  ceiling, best single threshold on them ({ceiling['threshold']:.2f}): {ceiling['best_single_threshold']:.4f}")


if __name__ == "__main__":
    main()
