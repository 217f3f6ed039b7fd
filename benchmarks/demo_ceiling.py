"""Print the demo's ceiling: the official F1 a model that saw modality, region and findings
perfectly could expect on a make-demo split (see pipeline/demo_ceiling.py).

    .venv/bin/python benchmarks/demo_ceiling.py demo/data [--split test]
"""

from __future__ import annotations

import argparse
from pathlib import Path


from conceptclef.pipeline.demo_ceiling import demo_ceiling  # noqa: E402


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
