"""The per-concept report: support, F1 and average precision of every concept, by frequency band.

The sample-averaged F1 is dominated by a few frequent concepts (modalities, body regions), so a
system can gain overall while the long tail gets worse. The report lists every concept of the
vocabulary, grouped by how frequent it was in training:

- head: the most frequent concepts that together make up the first half of all training labels;
- body: the next ones, up to 90% of the training labels;
- tail: the rest (the last 10% of the labels, usually most of the concepts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.metrics import average_precision_score

BAND_EDGES = (0.5, 0.9)  # cumulative share of training labels where head ends, then body
BANDS = ("head", "body", "tail")


def frequency_bands(train_frequency: np.ndarray, edges: tuple[float, float] = BAND_EDGES) -> np.ndarray:
    """Band name per concept from its training frequency (ties go to the earlier band)."""
    frequency = np.asarray(train_frequency, dtype=np.float64)
    order = np.argsort(-frequency, kind="stable")
    total = frequency.sum()
    # Share of all labels held by the concepts strictly more frequent than this one: a concept
    # starting inside the first half of the labels is head, and so on.
    before = (np.cumsum(frequency[order]) - frequency[order]) / total if total > 0 else np.zeros(len(order))
    bands = np.empty(len(frequency), dtype=object)
    bands[order] = np.where(before < edges[0], BANDS[0], np.where(before < edges[1], BANDS[1], BANDS[2]))
    return bands


def concept_report(
    cuis: Sequence[str],
    decisions: sp.spmatrix,
    probs: sp.spmatrix | np.ndarray,
    truth: sp.spmatrix,
    train_frequency: np.ndarray,
    names: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """One row per concept: band, training frequency, support, predictions, precision, recall, F1, AP."""
    decisions = sp.csc_matrix(decisions, dtype=bool)
    truth = sp.csc_matrix(truth, dtype=bool)
    probs = sp.csc_matrix(probs, dtype=np.float64)
    support = np.asarray(truth.sum(axis=0)).ravel().astype(np.int64)
    predicted = np.asarray(decisions.sum(axis=0)).ravel().astype(np.int64)
    hits = np.asarray(decisions.multiply(truth).sum(axis=0)).ravel().astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, hits / np.maximum(predicted, 1), np.nan)
        recall = np.where(support > 0, hits / np.maximum(support, 1), np.nan)
        f1 = np.where(support + predicted > 0, 2 * hits / np.maximum(support + predicted, 1), np.nan)
    average_precision = np.full(len(cuis), np.nan)
    for column in np.flatnonzero(support > 0):
        scores = probs[:, column].toarray().ravel()
        average_precision[column] = average_precision_score(truth[:, column].toarray().ravel(), scores)
    table = pd.DataFrame(
        {
            "cui": list(cuis),
            "band": frequency_bands(train_frequency),
            "train_frequency": np.asarray(train_frequency, dtype=np.float64),
            "support": support,
            "predicted": predicted,
            "true_positives": hits,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "average_precision": average_precision,
        }
    )
    if names is not None:
        table.insert(1, "name", [names.get(cui.upper(), "") for cui in cuis])
    table["band"] = pd.Categorical(table["band"], categories=BANDS, ordered=True)
    return table.sort_values(["band", "train_frequency", "cui"], ascending=[True, False, True], ignore_index=True)


def band_summary(report: pd.DataFrame) -> pd.DataFrame:
    """Per band: concept count, training-frequency range, support, and mean F1 / AP over concepts with support."""
    rows = []
    for band in BANDS:
        members = report[report["band"] == band]
        present = members[members["support"] > 0]
        rows.append(
            {
                "band": band,
                "concepts": len(members),
                "train_frequency_from": float(members["train_frequency"].min()) if len(members) else np.nan,
                "train_frequency_to": float(members["train_frequency"].max()) if len(members) else np.nan,
                "concepts_with_support": len(present),
                "support": int(members["support"].sum()),
                "mean_f1": float(present["f1"].mean()) if len(present) else np.nan,
                "mean_average_precision": float(present["average_precision"].mean()) if len(present) else np.nan,
            }
        )
    return pd.DataFrame.from_records(rows)


def band_summary_markdown(summary: pd.DataFrame, source: str) -> str:
    """A short Markdown table of the bands, with their edges stated."""
    lines = [
        f"Per-concept report (per_concept.csv) of the stacked ensemble on {source}. Bands by training frequency: "
        f"head = the most frequent concepts holding the first {BAND_EDGES[0]:.0%} of training labels, "
        f"body = up to {BAND_EDGES[1]:.0%}, tail = the rest. Mean F1 and average precision over concepts "
        "with support in these images.",
        "",
        "| band | concepts | training frequency | with support | support | mean F1 | mean AP |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for _, row in summary.iterrows():
        span = "" if pd.isna(row["train_frequency_from"]) else f"{row['train_frequency_from']:.2%}-{row['train_frequency_to']:.2%}"
        cells = [
            row["band"], str(row["concepts"]), span, str(row["concepts_with_support"]), str(row["support"]),
            "" if pd.isna(row["mean_f1"]) else f"{row['mean_f1']:.4f}",
            "" if pd.isna(row["mean_average_precision"]) else f"{row['mean_average_precision']:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
