"""Validation and training curves of several ``benchmarks/quality.py`` runs on one figure.

    python benchmarks/plot_quality.py --out docs/images/jsb_vrnn_nade_regularisation.png \\
        benchmarks/results/quality_jsb_vrnn-nade_cpu_epyc_2026-12.json:"no dropout" \\
        benchmarks/results/quality_jsb_vrnn-nade-dropout50_cpu_epyc_2026-12.json:"dropout 0.5"

Each argument is a result file, optionally followed by ``:LABEL`` (default: its config name);
its per-epoch ``history`` is drawn as ``dmm-jax plot`` draws several training logs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dmm_jax.plots import comparison_figure, save_png


def read_history(path: Path) -> list[dict]:
    """The per-epoch records of a quality result file."""
    try:
        history = json.loads(path.read_text())["history"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise SystemExit(f"{path}: not a quality result file with a history ({err})") from err
    if not history:
        raise SystemExit(f"{path}: empty history (a run scored from a checkpoint)")
    return history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="+", help="RESULT.json or RESULT.json:LABEL")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--span", type=float, default=3.0, help="nats per step shown")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    runs = {}
    for item in args.results:
        name, _, label = item.partition(".json:")
        path = Path(name if name.endswith(".json") else name + ".json")
        runs[label or path.stem.split("_")[2]] = read_history(path)
    print(save_png(comparison_figure(runs, span=args.span), args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
