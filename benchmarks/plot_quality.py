"""Validation and training curves of several ``benchmarks/quality.py`` runs on one figure.

    python benchmarks/plot_quality.py --out docs/images/jsb_vrnn_nade_regularisation.svg \\
        benchmarks/results/quality_jsb_vrnn-nade_cpu_epyc_2026-12.json:"no dropout" \\
        benchmarks/results/quality_jsb_vrnn-nade-dropout50_cpu_epyc_2026-12.json:"dropout 0.5"

Each argument is a result file, optionally followed by ``:LABEL`` (default: its config name);
its per-epoch ``history`` is drawn as ``dmm-jax plot`` draws several training logs. Under the
axes the figure names this command, and the CPU model, jax version and date of the runs as
their files record them. ``--out`` ending in ``.svg`` keeps that text as text (the figures in
``docs/images``); ``.png`` draws it into pixels.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from dmm_jax.plots import comparison_figure, save_figure


def read_result(path: Path) -> dict:
    """A quality result file with a non-empty per-epoch ``history``."""
    try:
        result = json.loads(path.read_text())
        history = result["history"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise SystemExit(f"{path}: not a quality result file with a history ({err})") from err
    if not history:
        raise SystemExit(f"{path}: empty history (a run scored from a checkpoint)")
    return result


def config_name(path: Path) -> str:
    """'quality_<dataset>_<config>_<machine>_<yyyy-mm>.json' -> '<config>'."""
    return path.stem.split("_")[2]


def cpu_description(machine: dict) -> str:
    """'AMD EPYC (cpu family 26 model 2 stepping 1, 2 cores)' from a result file's ``machine``."""
    details = [machine["cpu_signature"]] if machine.get("cpu_signature") else []
    if machine.get("cpus_on_machine"):
        details.append(f"{machine['cpus_on_machine']} cores")
    name = machine.get("cpu_model", "unknown CPU")
    return f"{name} ({', '.join(details)})" if details else name


def footnote(out: str, items: list[str], results: list[dict]) -> str:
    """Where the figure comes from: the command that drew it (``items``: its RESULT.json[:LABEL]
    arguments), the CPU model, jax version and date of the runs, as their files record them."""
    # One entry per CPU model: the most detailed description any run's file gives of it.
    described: dict[str, str] = {}
    for result in results:
        machine = result.get("machine", {})
        name, text = machine.get("cpu_model", "unknown CPU"), cpu_description(machine)
        described[name] = max(described.get(name, name), text, key=len)
    cpus = list(described.values())
    versions = sorted({r.get("versions", {}).get("jax", "?") for r in results})
    dates = sorted({r.get("date", "?") for r in results})
    command = ["python", "benchmarks/plot_quality.py", "--out", out, *items]
    return "\n".join(
        [
            shlex.join(command),
            (
                "trained by python benchmarks/quality.py, each command in its result file; "
                f"CPU {', '.join(cpus)}; jax {', '.join(versions)}; {', '.join(dates)}"
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="+", help="RESULT.json or RESULT.json:LABEL")
    parser.add_argument("--out", required=True, help="PNG or SVG file to write (by its suffix)")
    parser.add_argument("--span", type=float, default=3.0, help="nats per step shown")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    paths, labels = [], []
    for item in args.results:
        name, _, label = item.partition(".json:")
        paths.append(Path(name if name.endswith(".json") else name + ".json"))
        labels.append(label or config_name(paths[-1]))
    results = [read_result(path) for path in paths]
    runs = {label: result["history"] for label, result in zip(labels, results, strict=True)}
    note = footnote(args.out, args.results, results)
    figure = comparison_figure(runs, span=args.span, footnote=note)
    try:
        print(save_figure(figure, args.out))
    except ValueError as err:
        raise SystemExit(f"--out {err}") from err
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
