"""Flat layout against category folders on the same realistic demo images (issue 16's table).

For each layout (`folders2020 --realistic` and `flat2025`, same seed, sizes and label shares):
make-demo, train-all, ablation on the test images with the true categories; then the ensemble
re-fitted with other fold seeds (`train-all --only ensemble` on a copy of the run whose config
has another `seed`; the networks stay the same) for the fold noise of the stacked row. Prints a
Markdown table and writes OUT/summary.json.

    .venv/bin/python benchmarks/flat_vs_folders.py OUT [--seed 1 --train 1400 --valid 700 --test 1000]
        [--config configs/cpu.toml] [--set key=value ...] [--fold-seeds 1 2] [--layouts flat2025]
        [--ensemble-variant 'modality_features=true,modality_rule="auto"' ...]

Run it through /work/wt/slot on a shared machine: it trains two runs.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, str(ROOT / "cli.py"), "--quiet"]
ROWS = {
    "global": "global + tuned thresholds",
    "routed": "per-category, routed + tuned thresholds",
    "oracle": "per-category, oracle routing + tuned thresholds",
}


def run(*args: object) -> str:
    result = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def ablation_table(run_dir: Path, data: Path, out: Path) -> pd.DataFrame:
    run("ablation", "--run", run_dir, "--images", data / "test", "--gt", data / "test_concepts.csv",
        "--categories", data / "test_categories.csv", "--out", out)
    return pd.read_csv(out / "ablation.csv")


def row(table: pd.DataFrame, prefix: str) -> pd.Series:
    return table[table["system"].str.startswith(prefix)].iloc[0]


def measure_layout(out: Path, layout: str, args: argparse.Namespace) -> dict:
    data, run_dir = out / layout / "data", out / layout / "run"
    extra = ["--realistic"] if layout == "folders2020" else []
    run("make-demo", data, "--layout", layout, "--seed", args.seed, "--train", args.train, "--valid", args.valid,
        "--test", args.test, *extra)
    overrides = [item for pair in args.set for item in ("--set", pair)]
    run("train-all", "--data", data, "--out", run_dir, "--config", args.config, *overrides)
    table = ablation_table(run_dir, data, out / layout / "ablation")
    stacked = row(table, "stacked ensemble")
    router = json.loads((run_dir / "router" / "baseline.json").read_text())
    confusion = pd.read_csv(out / layout / "ablation" / "router_confusion.csv", index_col=0).drop(columns="accuracy")
    result = {
        "router_valid_accuracy": router["model"],
        "router_test_accuracy_true_categories": float(np.trace(confusion.to_numpy()) / max(confusion.to_numpy().sum(), 1)),
        "categories": json.loads((run_dir / "manifest.json").read_text())["categories"],
        "stacked": {"primary": stacked["overall"], "secondary": stacked["secondary"]},
        **{name: {"primary": row(table, system)["overall"], "secondary": row(table, system)["secondary"]}
           for name, system in ROWS.items() if table["system"].str.startswith(system).any()},
        "stacked_by_category": {column: stacked[column] for column in table.columns if re.fullmatch(r"DR[A-Z]{2}", column)},
        "fold_seeds": {},
        "out_of_fold": json.loads((run_dir / "ensemble" / "ensemble.json").read_text())["validation_scores"],
        "modality": json.loads((run_dir / "ensemble" / "ensemble.json").read_text()).get("modality"),
    }
    for variant in args.ensemble_variant:  # the same networks, the ensemble re-fitted with other [ensemble] settings
        copy = out / layout / "run-variant"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("ensemble"))
        settings = [item for pair in variant.split(",") for item in ("--set", f"ensemble.{pair.strip()}")]
        run("train-all", "--data", data, "--out", copy, "--only", "ensemble", *settings)
        refit = row(ablation_table(copy, data, out / layout / f"ablation-{len(result.setdefault('variants', {}))}"), "stacked ensemble")
        ensemble = json.loads((copy / "ensemble" / "ensemble.json").read_text())
        result["variants"][variant] = {
            "primary": refit["overall"], "secondary": refit["secondary"],
            "out_of_fold": ensemble["validation_scores"], "modality": ensemble.get("modality"),
        }
        shutil.rmtree(copy)
    for fold_seed in args.fold_seeds:  # the same networks, the ensemble cross-fitted on other folds
        copy = out / layout / f"run-fold{fold_seed}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("ensemble"))
        config = copy / "config.toml"
        config.write_text(re.sub(r"(?m)^seed = \d+", f"seed = {fold_seed}", config.read_text()))
        run("train-all", "--data", data, "--out", copy, "--only", "ensemble")
        refit = row(ablation_table(copy, data, out / layout / f"ablation-fold{fold_seed}"), "stacked ensemble")
        result["fold_seeds"][fold_seed] = {"primary": refit["overall"], "secondary": refit["secondary"]}
        shutil.rmtree(copy)
    return result


def markdown(results: dict[str, dict]) -> str:
    layouts = list(results)
    lines = ["| | " + " | ".join(layouts) + " |", "|---|" + "---:|" * len(layouts)]

    def add(label: str, values: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    add("router validation accuracy (derived categories on flat data)", [f"{results[name]['router_valid_accuracy']:.3f}" for name in layouts])
    add("router test accuracy (true categories)", [f"{results[name]['router_test_accuracy_true_categories']:.3f}" for name in layouts])
    for score in ("primary", "secondary"):
        add(f"routed minus global + tuned ({score})", [f"{results[n]['routed'][score] - results[n]['global'][score]:+.4f}" for n in layouts])
        add(f"stacked test {score}", [
            f"{results[n]['stacked'][score]:.4f}" + "".join(f" / {v[score]:.4f}" for v in results[n]["fold_seeds"].values())
            for n in layouts
        ])
        add(f"global + tuned {score}", [f"{results[n]['global'][score]:.4f}" for n in layouts])
        add(f"routed {score}", [f"{results[n]['routed'][score]:.4f}" for n in layouts])
        add(f"oracle routing {score}", [f"{results[n].get('oracle', {}).get(score, float('nan')):.4f}" for n in layouts])
    variants = sorted({name for result in results.values() for name in result.get("variants", {})})
    for variant in variants:
        for score in ("primary", "secondary"):
            add(f"stacked test {score}, ensemble {variant}",
                [f"{results[n]['variants'][variant][score]:.4f}" if variant in results[n].get("variants", {}) else "" for n in layouts])
    add("out-of-fold validation primary / secondary",
        [f"{results[n]['out_of_fold']['primary_f1']:.4f} / {results[n]['out_of_fold']['secondary_f1']:.4f}" for n in layouts])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=700)
    parser.add_argument("--valid", type=int, default=350)
    parser.add_argument("--test", type=int, default=250)
    parser.add_argument("--config", default=str(ROOT / "configs" / "cpu.toml"))
    parser.add_argument("--set", action="append", default=[], help="config override for train-all (repeatable)")
    parser.add_argument("--fold-seeds", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--layouts", nargs="*", default=["folders2020", "flat2025"])
    parser.add_argument("--ensemble-variant", action="append", default=[],
                        help='[ensemble] settings to re-fit the ensemble with, comma-separated, e.g. "modality_features=true" (repeatable)')
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {layout: measure_layout(args.out, layout, args) for layout in args.layouts}
    (args.out / "summary.json").write_text(json.dumps(results, indent=2, default=float))
    print(markdown(results))


if __name__ == "__main__":
    main()
