"""`solo-plot RUN_DIR [RUN_DIR ...] --output curves.png`: loss curves of one or more stages.

matplotlib draws; the data is each run's `metrics.jsonl` (one line per step, written by
solo-train). Stages given in order are laid end to end on one step axis, as in the paper's
figures, with the vision-language and text-only losses drawn apart (SOLO Fig. 3, 11), and the
validation losses (solo.evaluate: `val_*`, at the steps evaluated) as marked points on the same axes,
and the probe's held-out accuracy (`solo.probe`), where a stage has one, on a second axis (0 to 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a solo-train save_dir?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(run_dirs: list[str | Path], output: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    probe_ax = None
    offset = 0
    for run_dir in run_dirs:
        rows = read_metrics(run_dir)
        if not rows:
            continue
        stage = rows[0].get("stage", Path(run_dir).name)
        steps = [offset + r["step"] for r in rows]
        for key, style in (("loss", "-"), ("vl_loss", "--"), ("text_loss", ":"),
                           ("val_loss", "o-"), ("val_vl_loss", "s--"), ("val_text_loss", "^:")):
            points = [(s, r[key]) for s, r in zip(steps, rows, strict=True) if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=f"{stage} {key.replace('_', ' ')}")
        probes = [(s, r["probe_accuracy"]) for s, r in zip(steps, rows, strict=True) if "probe_accuracy" in r]
        if probes:
            probe_ax = probe_ax or _probe_axis(ax)
            probe_ax.plot(*zip(*probes, strict=True), "o-", color="black", markersize=3, linewidth=1,
                          label=f"{stage} probe accuracy")
        offset = steps[-1]
        ax.axvline(offset, color="grey", linewidth=0.5)
    ax.set_xlabel("step (stages end to end)")
    ax.set_ylabel("language-modeling loss")
    handles, labels = ax.get_legend_handles_labels()
    if probe_ax is not None:
        more = probe_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    # Below the axes: a legend inside would cover the curves of a four-stage plot.
    ax.legend(handles, labels, fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return output


def _probe_axis(ax):
    probe_ax = ax.twinx()
    probe_ax.set_ylim(0, 1.02)
    probe_ax.set_ylabel("probe accuracy (held-out images)")
    return probe_ax


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="solo-plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="solo-train save_dir of each stage, in order")
    parser.add_argument("--output", default="loss_curves.png")
    args = parser.parse_args(argv)
    try:
        print(plot_runs(args.runs, args.output))
    except FileNotFoundError as e:
        print(f"solo-plot: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
