"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Each function takes plain numbers (accuracies in %, NaN where a run is missing) and writes one PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 120


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _colours(count: int) -> list:
    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(i % palette.N) for i in range(count)]


def training_curves(records: dict[tuple[int, str], list[dict]], shots: Sequence[int], labels: Sequence[str],
                    path: Path, validation_key: str = "val_acc") -> None:
    """Training loss and validation accuracy against episodes; a row per K, a line per variant.

    `records[(K, label)]` are the metrics.jsonl records of that run; `validation_key` the key of their
    validation scores (`test_acc` for runs that chose their checkpoint on the test split). Parameter-free
    heads have one validation point at episode 0, drawn as a dot.
    """
    figure = _figure(11, 3.2 * len(shots))
    axes = figure.subplots(len(shots), 2, squeeze=False)
    colours = dict(zip(labels, _colours(len(labels))))
    for row, k in enumerate(shots):
        loss_axis, val_axis = axes[row]
        for label in labels:
            log = records.get((k, label), [])
            for axis, key in ((loss_axis, "loss"), (val_axis, validation_key)):
                points = [(r["episode"], r[key]) for r in log if key in r]
                if points:
                    x, y = zip(*points)
                    axis.plot(x, np.array(y) * (100 if key == validation_key else 1), color=colours[label],
                              label=label, marker="o" if len(points) == 1 else None, linewidth=1.2)
        loss_axis.set(title=f"{k}-shot: training loss", xlabel="training episode", ylabel="loss")
        val_axis.set(title=f"{k}-shot: validation accuracy ({validation_key})", xlabel="training episode",
                     ylabel="accuracy (%)")
        for axis in (loss_axis, val_axis):
            axis.grid(alpha=0.3)
    axes[0][1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    figure.savefig(path, dpi=DPI)


def ablation_bars(labels: Sequence[str], shots: Sequence[int], accuracy: np.ndarray, ci95: np.ndarray,
                  paper: np.ndarray, title: str, path: Path) -> None:
    """Grouped bars, [variants, K] each, with 95% CIs; the paper's numbers as black marks where it has them."""
    figure = _figure(max(6.0, 1.0 + 0.9 * len(labels) * max(1, len(shots)) / 2), 4.2)
    axis = figure.subplots()
    width = 0.8 / len(shots)
    positions = np.arange(len(labels))
    paper_label = "paper"
    for j, (k, colour) in enumerate(zip(shots, _colours(len(shots)))):
        x = positions - 0.4 + width * (j + 0.5)
        axis.bar(x, np.nan_to_num(accuracy[:, j]), width, yerr=np.nan_to_num(ci95[:, j]), color=colour,
                 capsize=3, label=f"{k}-shot")
        if np.isfinite(paper[:, j]).any():
            axis.scatter(x, paper[:, j], marker="_", s=160, color="black", zorder=3, label=paper_label)
            paper_label = None   # one legend entry for all of them
    shown = np.concatenate([accuracy[np.isfinite(accuracy)], paper[np.isfinite(paper)]])
    if shown.size:   # start near the lowest number: the differences are what the figure is for
        axis.set_ylim(bottom=max(0.0, float(shown.min()) - 10))
    axis.set_xticks(positions, labels, rotation=25, ha="right")
    axis.set(ylabel="5-way accuracy (%)", title=title)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize="small")
    figure.savefig(path, dpi=DPI)


def accuracy_curve(name: str, values: Sequence, shots: Sequence[int], accuracy: np.ndarray, ci95: np.ndarray,
                   paper: np.ndarray, title: str, path: Path) -> None:
    """Accuracy against a variant value (Fig. 5: the number of templates R), a line per K with its CI band."""
    figure = _figure(6, 4)
    axis = figure.subplots()
    for j, (k, colour) in enumerate(zip(shots, _colours(len(shots)))):
        axis.errorbar(values, accuracy[:, j], yerr=ci95[:, j], marker="o", capsize=3, color=colour, label=f"{k}-shot")
        if np.isfinite(paper[:, j]).any():
            axis.plot(values, paper[:, j], linestyle="none", marker="s", markerfacecolor="none", color=colour,
                      label=f"paper, {k}-shot")
    axis.set(xlabel=name, ylabel="5-way accuracy (%)", title=title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.savefig(path, dpi=DPI)


def embedding_map(panels: Sequence[tuple[str, np.ndarray]], classes: Sequence[str], path: Path) -> None:
    """2-D maps [V, 2] side by side, each dot a test video coloured by its class (Fig. 6)."""
    figure = _figure(5.2 * len(panels), 4.8)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    names = sorted(set(classes))
    colours = dict(zip(names, _colours(len(names))))
    labels = np.array(classes)
    for axis, (title, points) in zip(axes, panels):
        for name in names:
            chosen = points[labels == name]
            axis.scatter(chosen[:, 0], chosen[:, 1], s=14, color=colours[name], label=name)
        axis.set(title=title, xticks=[], yticks=[])
    axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    figure.savefig(path, dpi=DPI)
