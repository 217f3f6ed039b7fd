"""Ablation report files: a CSV, a Markdown table and PNG plots a reader can look at."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from conceptclef.core.runfiles import atomic_output, atomic_write_text  # noqa: E402
from conceptclef.ensemble.sparse_ops import at_least_csr  # noqa: E402
from conceptclef.pipeline.stages.concept_report import band_summary, band_summary_markdown  # noqa: E402
from conceptclef.scoring.f1 import per_image_f1_sparse  # noqa: E402


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub Markdown table with F1 to four decimals (no extra dependency such as tabulate)."""
    columns = list(table.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if c == "system" else "---:" for c in columns) + "|"]
    for _, row in table.iterrows():
        cells = []
        for column in columns:
            value = row[column]
            if column == "system":
                cells.append(str(value))
            elif column == "n_images":
                cells.append(str(int(value)))
            else:
                cells.append("" if pd.isna(value) else f"{value:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _save_figure(figure: plt.Figure, path: Path) -> None:
    with atomic_output(path, "wb") as stream:
        figure.savefig(stream, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def plot_category_bars(table: pd.DataFrame, path: Path, grouped_by: str) -> None:
    groups = [c for c in table.columns if c not in ("system", "overall", "secondary", "n_images")]
    figure, axis = plt.subplots(figsize=(max(7, 1.3 * len(groups) + 3), 4.5))
    width = 0.8 / max(len(table), 1)
    positions = np.arange(len(groups) + 1)
    for offset, (_, row) in enumerate(table.iterrows()):
        values = [row["overall"]] + [row[g] for g in groups]
        axis.bar(positions + offset * width, np.nan_to_num(np.array(values, dtype=float)), width, label=row["system"])
    axis.set_xticks(positions + 0.4 - width / 2)
    axis.set_xticklabels(["overall"] + groups)
    axis.set_ylabel("sample-averaged F1")
    axis.set_title(f"F1 per category ({grouped_by})")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save_figure(figure, path)


def plot_confusion(categories: list[str], matrix: np.ndarray, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(5.5, 5))
    image = axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(categories)), categories, rotation=45, ha="right")
    axis.set_yticks(range(len(categories)), categories)
    axis.set_xlabel("routed to")
    axis.set_ylabel("true category")
    for (row, column), value in np.ndenumerate(matrix):
        axis.text(column, row, str(value), ha="center", va="center", fontsize=8, color="black" if value < matrix.max() / 2 else "white")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    axis.set_title(f"router confusion (accuracy {accuracy:.3f})")
    figure.colorbar(image, ax=axis, fraction=0.046)
    _save_figure(figure, path)


def write_confusion_csv(categories: list[str], matrix: np.ndarray, path: Path) -> None:
    """The router's confusion matrix (rows: true category, columns: routed to) with each row's accuracy."""
    matrix = np.asarray(matrix, dtype=np.int64)
    frame = pd.DataFrame(matrix, index=pd.Index(list(categories), name="true category"), columns=list(categories))
    totals = matrix.sum(axis=1)
    frame["accuracy"] = np.where(totals > 0, np.diag(matrix) / np.maximum(totals, 1), np.nan)
    with atomic_output(path, "w") as stream:
        frame.to_csv(stream, float_format="%.4f")


def threshold_curve(probs: np.ndarray | sp.spmatrix, truth: sp.spmatrix, outside: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Official F1 when one global threshold is applied to every concept.

    Only scores at or above the lowest threshold can be chosen, so only those are kept (block by
    block for a dense matrix): the same curve without a CSR copy of every (image, concept) pair.
    """
    floor = float(np.min(thresholds))
    probs = at_least_csr(probs, probs.shape, floor) if not sp.issparse(probs) else sp.csr_matrix(probs)
    scores = []
    for threshold in thresholds:
        decided = probs.copy()
        decided.data = decided.data >= threshold
        decided.eliminate_zeros()
        per_image = per_image_f1_sparse(decided, truth, outside)
        scores.append(float(np.nanmean(per_image)) if np.isfinite(per_image).any() else 0.0)
    return np.array(scores)


def plot_threshold_curves(curves: dict, path: Path) -> None:
    thresholds = np.linspace(0.02, 0.9, 45)
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, (probs, labelled) in curves.items():
        scores = threshold_curve(probs, labelled.truth, labelled.truth_outside, thresholds)
        best = int(np.argmax(scores))
        axis.plot(thresholds, scores, label=f"{name} (best {scores[best]:.3f} at {thresholds[best]:.2f})")
    axis.set_xlabel("one global threshold")
    axis.set_ylabel("sample-averaged F1")
    axis.set_title("threshold vs F1")
    axis.legend(fontsize=8)
    _save_figure(figure, path)


def write_ablation_report(
    out_dir: Path,
    table: pd.DataFrame,
    source: str,
    grouped_by: str,
    confusion: tuple[list[str], np.ndarray],
    threshold_curves: dict,
    fallback_categories: list[str],
    per_concept: pd.DataFrame | None = None,
    secondary_table: pd.DataFrame | None = None,
) -> str:
    """Write ablation.csv, ablation.md, three PNGs, per_concept.csv and ablation_secondary.csv (the
    secondary score per category); return the Markdown text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir / "ablation.csv", "w") as stream:
        table.to_csv(stream, index=False, float_format="%.4f")
    header = f"Ablation on {source}; per-category columns grouped by {grouped_by}.\n"
    if fallback_categories:
        header += f"Categories using the global model (too few images, or the only category): {', '.join(fallback_categories)}.\n"
    header += "The secondary column is the 2025/2026 secondary score (15 modality and X-ray region CUIs).\n"
    markdown = header + "\n" + markdown_table(table)
    if secondary_table is not None:
        with atomic_output(out_dir / "ablation_secondary.csv", "w") as stream:
            secondary_table.to_csv(stream, index=False, float_format="%.4f")
        markdown += (f"\nSecondary score per category (grouped by {grouped_by}; n_images: images whose truth has a secondary CUI"
                     "):\n\n" + markdown_table(secondary_table))
    if per_concept is not None:
        with atomic_output(out_dir / "per_concept.csv", "w") as stream:
            per_concept.to_csv(stream, index=False, float_format="%.4f")
        markdown += "\n" + band_summary_markdown(band_summary(per_concept), source)
    atomic_write_text(out_dir / "ablation.md", markdown)
    plot_category_bars(table, out_dir / "per_category_f1.png", grouped_by)
    plot_confusion(confusion[0], confusion[1], out_dir / "router_confusion.png")
    write_confusion_csv(confusion[0], confusion[1], out_dir / "router_confusion.csv")
    plot_threshold_curves(threshold_curves, out_dir / "threshold_vs_f1.png")
    return markdown
