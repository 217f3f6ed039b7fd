"""Time and memory of the whole post-processing chain at ImageCLEF 2020 scale, on 2 CPU cores.

Builds synthetic inputs of the real size (80,723 images x 3,047 CUIs, ~11 true concepts per
image; a global and 7 per-category models stored as float16, router probabilities, sparse kNN
scores) and times each stage the pipeline runs after the networks:

- candidates + features for ALL 80,723 images (more than the pipeline needs: an upper bound);
- stacker cross-fitting where the pipeline fits it: a validation-sized set (ImageCLEF 2020:
  15,970 images), K folds + the final fit;
- stacked prediction for a test-sized set (ImageCLEF 2020: 3,534 images); the cost for all
  80,723 images is extrapolated from the measured per-pair rate, not run (LightGBM prediction
  is linear in pairs);
- per-concept threshold tuning on an 80,723 x 3,047 probability matrix with the stacker's exact
  sparsity (every candidate pair; the values are the router-mixture probabilities, since
  stacking all 80,723 images is not what runs) and, as run in the pipeline, on the out-of-fold
  stacked probabilities of the validation-sized set;
- decoding, official scoring (sparse and string-set) and writing the submission.

Also times a straightforward per-concept loop over candidate thresholds that calls
scikit-learn's f1_score, on a few concepts, and extrapolates it (clearly labelled).

    .venv/bin/python benchmarks/postprocess_scale.py --images 80723 --concepts 3047 --models 8 --per-image 11
    .venv/bin/python benchmarks/postprocess_scale.py --quick
    .venv/bin/python benchmarks/postprocess_scale.py --year 2026 [--scale 0.25]

`--year 2026` is ImageCLEFmedical 2026's size: 116,604 images (97,000 train + 19,240 valid +
a few) x 2,646 CUIs, ~4 true concepts per image, a global and 7 per-category models, the
stacker cross-fitted on the 19,240 validation images and predicting 15,000 test images; the
models' outputs are written to float16 .npy files and read through memory maps (`--on-disk`),
as a run reads its saved model outputs. Peak memory is shown as RSS (which counts the mapped
file pages read, page cache the kernel can drop) and as anonymous memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from conceptclef.core.config import EnsembleConfig
from conceptclef.ensemble.decoding import ExpectedF1Decoder
from conceptclef.ensemble.features import build_pair_table
from conceptclef.ensemble.folds import image_folds
from conceptclef.ensemble.mixing import mixture_at
from conceptclef.ensemble.sparse_ops import as_score_csr
from conceptclef.ensemble.stacker import ConceptStacker, cross_fit_table, pair_labels, table_to_csr
from conceptclef.ensemble.thresholds import ConceptThresholdTuner, tune_global_threshold
from conceptclef.scoring.f1 import mean_sample_f1_sparse, sample_f1
from synthetic_stacking import make_synthetic_set

IMAGECLEF_2020_VALIDATION_IMAGES = 15_970
IMAGECLEF_2020_TEST_IMAGES = 3_534


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class AnonymousPeak:
    """Peak anonymous resident memory (RssAnon of /proc/self/status), polled by a thread."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.peak_bytes = 0
        self._interval_s = interval_s
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        while True:
            with open("/proc/self/status") as stream:
                for line in stream:
                    if line.startswith("RssAnon:"):
                        self.peak_bytes = max(self.peak_bytes, int(line.split()[1]) * 1024)
            time.sleep(self._interval_s)

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / 1024**3


ANONYMOUS_PEAK = AnonymousPeak() if Path("/proc/self/status").is_file() else None


def anonymous_peak_gb() -> float:
    return ANONYMOUS_PEAK.peak_gb if ANONYMOUS_PEAK is not None else float("nan")


def current_rss_gb() -> float:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3


class Timer:
    """Runs named stages, printing seconds and memory as it goes, and keeps the totals."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, work: Callable[[], Any], in_chain: bool = True) -> Any:
        start = time.perf_counter()
        result = work()
        elapsed = time.perf_counter() - start
        if in_chain:
            self.seconds[name] = elapsed
        print(
            f"  {name:<56s} {elapsed:8.2f} s   rss {current_rss_gb():5.2f} GB   peak {peak_rss_gb():5.2f} GB"
            f"   peak anonymous {anonymous_peak_gb():5.2f} GB",
            flush=True,
        )
        return result


def write_submission_file(path: Path, image_ids: list[str], labels: sp.csr_matrix, cuis: np.ndarray) -> None:
    """Through data.submission when present (another package), else a plain 2020-format TSV."""
    predictions = {
        image_id: cuis[labels.indices[labels.indptr[i] : labels.indptr[i + 1]]].tolist()
        for i, image_id in enumerate(image_ids)
    }
    try:
        from conceptclef.data.submission import write_submission
    except ImportError:
        lines = [f"{image_id}\t{';'.join(concepts)}" for image_id, concepts in predictions.items()]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return
    write_submission(path, predictions, format="2020")


def sklearn_per_concept_baseline(
    probs: sp.csr_matrix,
    truth: sp.csr_matrix,
    start_thresholds: np.ndarray,
    concepts: np.ndarray,
    thresholds_per_concept: int,
) -> tuple[float, int]:
    """(seconds, f1_score calls) of the straightforward loop: per concept, per candidate threshold,
    rebuild the label matrix with that concept re-decided and call sklearn's samples-F1."""
    from sklearn.metrics import f1_score

    scores = as_score_csr(probs)
    decided = sp.csr_matrix((scores.data >= start_thresholds[scores.indices], scores.indices, scores.indptr),
                            shape=scores.shape, dtype=bool)
    calls = 0
    start = time.perf_counter()
    for concept in concepts:
        column = scores[:, concept].toarray().ravel()
        candidates = np.unique(column[column > 0])
        if candidates.size > thresholds_per_concept:
            candidates = np.quantile(candidates, np.linspace(0, 1, thresholds_per_concept))
        best = (-1.0, start_thresholds[concept])
        others = decided.tolil()
        others[:, concept] = False
        others = others.tocsr()
        for threshold in candidates:
            column_decision = sp.csr_matrix((column >= threshold)[:, None])
            trial = others + sp.hstack(
                [sp.csr_matrix((scores.shape[0], concept)), column_decision,
                 sp.csr_matrix((scores.shape[0], scores.shape[1] - concept - 1))], format="csr")
            value = f1_score(truth, trial.astype(bool), average="samples", zero_division=0)
            calls += 1
            best = max(best, (value, threshold))
    return time.perf_counter() - start, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=80_723)
    parser.add_argument("--concepts", type=int, default=3_047)
    parser.add_argument("--models", type=int, default=8, help="global + (models - 1) category models")
    parser.add_argument("--per-image", type=float, default=11.0, help="mean true concepts per image")
    parser.add_argument("--stacker-images", type=int, default=IMAGECLEF_2020_VALIDATION_IMAGES,
                        help="images the stacker is cross-fitted on (the validation split in the pipeline)")
    parser.add_argument("--test-images", type=int, default=IMAGECLEF_2020_TEST_IMAGES,
                        help="images the fitted stacker predicts (the test split)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="LightGBM threads")
    parser.add_argument("--baseline-concepts", type=int, default=2)
    parser.add_argument("--baseline-thresholds", type=int, default=5,
                        help="thresholds per concept actually run through the sklearn loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a small run (8,000 images x 600 concepts)")
    parser.add_argument("--year", choices=("2020", "2026"), default="2020",
                        help="2026: 116,604 images x 2,646 CUIs, 8 models, ~4 concepts/image, outputs on disk")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the images (with --year 2026)")
    parser.add_argument("--negative-fraction", type=float, default=EnsembleConfig().negative_fraction,
                        help="share of negative pairs each stacker fit keeps on a large table (1: every pair)")
    parser.add_argument("--on-disk", type=Path, default=None,
                        help="write the models' outputs here (float16 .npy, read by memory map); --year 2026: a temporary folder")
    args = parser.parse_args()
    if args.quick:
        args.images, args.concepts, args.stacker_images, args.test_images = 8_000, 600, 3_000, 1_000
    if args.year == "2026":
        args.images, args.concepts, args.models, args.per_image = round(116_604 * args.scale), 2_646, 8, 4.0
        args.stacker_images, args.test_images = round(19_240 * args.scale), round(15_000 * args.scale)
    with tempfile.TemporaryDirectory(prefix="postprocess_outputs_") as scratch:
        on_disk = args.on_disk or (Path(scratch) if args.year == "2026" else None)
        if on_disk is not None:
            on_disk.mkdir(parents=True, exist_ok=True)
        run_chain(args, on_disk)


def run_chain(args: argparse.Namespace, on_disk: Path | None) -> None:
    config = dataclasses.replace(EnsembleConfig(), negative_fraction=args.negative_fraction)
    n, v = args.images, args.concepts
    print(f"post-processing benchmark: {n:,} images x {v:,} concepts, {args.models} models, "
          f"~{args.per_image:g} true concepts/image, {os.cpu_count()} cores, LightGBM threads {args.threads}, "
          f"load average {os.getloadavg()[0]:.2f}")
    timer = Timer()

    print("building synthetic inputs (not part of the chain)")
    synthetic = timer.run("generate inputs", lambda: make_synthetic_set(
        n, v, n_categories=args.models - 1, labels_per_image=args.per_image, seed=args.seed, out_dir=on_disk), in_chain=False)
    inputs, truth, outside = synthetic.inputs, synthetic.truth, synthetic.truth_outside
    stored = [inputs.global_probs, *(getattr(p, "probs", p) for p in inputs.category_probs.values())]  # on disk: own columns
    print(f"  model probabilities: {1 + len(inputs.category_probs)} models over {n:,} images, "
          f"{', '.join(str(p.shape[1]) for p in stored)} columns, {inputs.global_probs.dtype} = "
          f"{sum(p.nbytes for p in stored) / 1024**3:.2f} GB; kNN nnz {inputs.knn_scores.nnz:,}; "
          f"truth nnz {truth.nnz:,} (+{int(outside.sum()):,} outside the vocabulary)")

    print("chain")
    table = timer.run("candidates + features (all images)", lambda: build_pair_table(inputs, config.candidates_per_model))
    labels = pair_labels(table, truth)
    pairs = table.candidates.n_pairs
    print(f"    {pairs:,} pairs ({pairs / n:.1f} per image), {table.features.shape[1]} features, "
          f"candidate recall {labels.sum() / (truth.nnz + outside.sum()):.3f} of all true concepts")

    stacker_rows = np.arange(min(args.stacker_images, n))  # first images: validation-sized; last: test-sized
    in_stacker_set = np.zeros(n, dtype=bool)
    in_stacker_set[stacker_rows] = True
    fit_pairs = in_stacker_set[table.candidates.rows]
    fit_table, fit_labels = table.take(fit_pairs), labels[fit_pairs]
    folds = image_folds(stacker_rows.size, config.folds, args.seed)
    print(f"    stacker cross-fit set: {stacker_rows.size:,} images, {fit_table.candidates.n_pairs:,} pairs "
          f"({int(fit_labels.sum()):,} positive), {config.folds} folds + final, at most {config.n_estimators} trees")
    if fit_table.candidates.n_pairs >= config.subsample_from_pairs and config.negative_fraction < 1:
        print(f"    each fit keeps every positive pair and {config.negative_fraction:g} of the negative ones, "
              f"weighted {1 / config.negative_fraction:g} (tables of at least {config.subsample_from_pairs:,} pairs)")

    def cross_fit() -> tuple[ConceptStacker, np.ndarray]:
        oof, final, rounds = cross_fit_table(fit_table, fit_labels, folds, inputs.categories, config, args.seed, args.threads)
        print(f"    boosting rounds chosen on the held-out folds: {rounds}")
        return final, oof

    stacker, oof = timer.run(f"stacker cross-fit ({config.folds} folds + final)", cross_fit)
    oof_probs = table_to_csr(fit_table, oof)[: stacker_rows.size]
    test_rows = np.arange(n - min(args.test_images, n), n)
    in_test_set = np.zeros(n, dtype=bool)
    in_test_set[test_rows] = True
    test_table = table.take(in_test_set[table.candidates.rows])
    test_probs = timer.run(f"stacked prediction ({test_rows.size:,} test-sized images)",
                           lambda: stacker.predict_table(test_table))
    rate = timer.seconds[f"stacked prediction ({test_rows.size:,} test-sized images)"] / max(test_probs.size, 1)
    print(f"    {test_probs.size:,} pairs; all {n:,} images would take ~{rate * pairs:.0f} s "
          f"(EXTRAPOLATED at {rate * 1e6:.1f} us/pair, not run)")
    test_stacked = table_to_csr(test_table, test_probs)[test_rows]
    del fit_table, test_table

    tuner_oof = timer.run(f"threshold tuning, OOF stacked ({stacker_rows.size:,} images)", lambda: ConceptThresholdTuner(
        config.threshold_prior_strength, config.min_labels, config.max_labels).fit(
            oof_probs, truth[stacker_rows], outside[stacker_rows]))
    oof_truth, oof_outside = truth[stacker_rows], outside[stacker_rows]
    oof_global = tune_global_threshold(oof_probs, oof_truth, oof_outside)[1]
    oof_tuned = mean_sample_f1_sparse(tuner_oof.predict(oof_probs), oof_truth, oof_outside)
    print(f"    in-sample official F1 on the OOF stacked probabilities: one global threshold {oof_global:.4f}, "
          f"per-concept thresholds {oof_tuned:.4f}")
    held_out = mean_sample_f1_sparse(tuner_oof.predict(test_stacked), truth[test_rows], outside[test_rows])
    print(f"    HELD-OUT official F1 of the stacked test-sized images, thresholds tuned on the OOF probabilities: {held_out:.4f}")
    del test_stacked

    mixture, _ = mixture_at(inputs, table.candidates.rows, table.candidates.cols)
    stacked = table_to_csr(table, np.nan_to_num(mixture, nan=0.0))
    del mixture
    print(f"    full-size tuning input: {stacked.shape[0]:,} x {stacked.shape[1]:,}, {stacked.nnz:,} probabilities "
          f"({stacked.nnz / n:.1f} per image; router-mixture values on the stacker's candidate pairs)")
    tuner = timer.run(f"threshold tuning, full size ({n:,} images)", lambda: ConceptThresholdTuner(
        config.threshold_prior_strength, config.min_labels, config.max_labels).fit(stacked, truth, outside))
    print(f"    global threshold {tuner.global_threshold_:.3f}; objective by sweep "
          f"{', '.join(f'{score:.4f}' for score in tuner.sweep_scores_)}")
    chosen = timer.run("apply thresholds + label-count rule (full size)", lambda: tuner.predict(stacked))
    score = timer.run("official score, sparse (full size)", lambda: mean_sample_f1_sparse(chosen, truth, outside))
    decoded = timer.run("expected-F1 decoding, alternative rule (full size)", lambda: ExpectedF1Decoder(
        config.min_labels, config.max_labels).fit(stacked, truth, outside).predict(stacked))
    decoded_score = mean_sample_f1_sparse(decoded, truth, outside)

    cuis = np.array([f"C{index:07d}" for index in range(v)])
    with tempfile.TemporaryDirectory(prefix="postprocess_scale_") as folder:
        path = Path(folder) / "submission.tsv"
        timer.run("write submission (full size)", lambda: write_submission_file(path, inputs.image_ids, chosen, cuis))
        size_mb = path.stat().st_size / 1024**2

    def official_dict_score() -> float:
        predicted = {inputs.image_ids[i]: cuis[chosen.indices[chosen.indptr[i]:chosen.indptr[i + 1]]]
                     for i in range(n)}
        true = {inputs.image_ids[i]: list(cuis[truth.indices[truth.indptr[i]:truth.indptr[i + 1]]])
                + [f"OUTSIDE{j}" for j in range(outside[i])] for i in range(n)}
        return sample_f1(predicted, true).score

    dict_score = timer.run("official score, string sets as the script (full size)", official_dict_score)
    print(f"    submission {size_mb:.1f} MB; official F1 of the full-size label sets: thresholds {score:.4f} "
          f"(string-set scorer {dict_score:.4f}), expected-F1 decoding {decoded_score:.4f}")

    total = sum(timer.seconds.values())
    print(f"chain total {total:.1f} s ({total / 60:.1f} min); peak memory {peak_rss_gb():.2f} GB "
          f"(anonymous {anonymous_peak_gb():.2f} GB)")

    print("baseline: per-concept loop calling sklearn f1_score(average='samples') (EXTRAPOLATED)")
    rng = np.random.default_rng(args.seed)
    column_counts = np.diff(stacked.tocsc().indptr)
    busy = np.flatnonzero(column_counts > 0)
    concepts = rng.choice(busy, size=min(args.baseline_concepts, busy.size), replace=False)
    start_thresholds = np.full(v, tuner.global_threshold_)
    seconds, calls = sklearn_per_concept_baseline(stacked, truth, start_thresholds, concepts, args.baseline_thresholds)
    per_call = seconds / max(calls, 1)
    cuts = int(busy.size)
    same_candidates = per_call * stacked.nnz * (len(tuner.sweep_scores_) - 1)
    grid_20 = per_call * 20 * cuts
    tuning = timer.seconds[f"threshold tuning, full size ({n:,} images)"]
    print(f"  measured: {calls} f1_score calls on {concepts.size} concepts in {seconds:.1f} s = {per_call:.2f} s per call")
    print(f"  extrapolated, same candidate thresholds as the tuner ({stacked.nnz:,} x "
          f"{len(tuner.sweep_scores_) - 1} sweeps): {same_candidates / 3600:,.0f} h -> tuner is "
          f"{same_candidates / tuning:,.0f}x faster")
    print(f"  extrapolated, only a 20-threshold grid per concept, one sweep ({cuts:,} concepts): "
          f"{grid_20 / 3600:,.1f} h -> tuner is {grid_20 / tuning:,.0f}x faster")
    targets = {
        "threshold tuning < 60 s": tuning < 60,
        "whole chain < 10 min": total < 600,
        "peak memory < 8 GB": peak_rss_gb() < 8,
    } if args.year == "2020" else {
        "whole chain < 3 min": total < 180,
        "peak memory < 6 GB": peak_rss_gb() < 6,
        "peak anonymous memory < 6 GB": anonymous_peak_gb() < 6,
    }
    print("targets: " + ", ".join(f"{name}: {'met' if met else 'MISSED'}" for name, met in targets.items()))


if __name__ == "__main__":
    main()
