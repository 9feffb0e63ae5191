"""PNG bar charts of speedups. matplotlib is an optional extra (`pip install resnet_fused[plot]`)."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

MISSING_MATPLOTLIB = ("matplotlib is not installed, so no PNG was written; install the optional extra with "
                      "`pip install matplotlib` (or `pip install resnet_fused[plot]`)")


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def bar_chart(path, labels: Sequence[str], series: Dict[str, List[float]], *, title: str,
              xlabel: str = "speedup vs eager (x)", baseline: float = 1.0) -> None:
    """Grouped horizontal bars, each labelled with its value: one group per label, one bar per series entry
    (missing values as NaN)."""
    panel_chart(path, [("", labels, series)], title=title, xlabel=xlabel, baseline=baseline)


def panel_chart(path, panels: Sequence[Tuple[str, Sequence[str], Dict[str, List[float]]]], *, title: str,
                xlabel: str = "speedup vs eager (x)", baseline: float = 1.0) -> None:
    """Stacked panels of grouped horizontal bars: panels = [(panel title, row labels, {series: values})]."""
    plt = _pyplot()
    heights = [max(1.5, 0.28 * len(labels) * max(len(series), 1) + 0.9) for _, labels, series in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    every_name = sorted({name for _, _, series in panels for name in series})
    colors = {name: f"C{i % 10}" for i, name in enumerate(every_name)}  # one color per provider in every panel
    for ax, (panel_title, labels, series) in zip(axes[:, 0], panels):
        names = list(series)
        height = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            values = series[name]
            positions = [row + i * height for row in range(len(labels))]
            bars = ax.barh(positions, values, height=height, label=name, color=colors[name])
            ax.bar_label(bars, labels=[f"{v:.2f}x" if v == v else "" for v in values], fontsize=6, padding=2)
        ax.set_yticks([row + height * (len(names) - 1) / 2 for row in range(len(labels))])
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(baseline, color="black", linewidth=0.8, linestyle="--")
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.margins(x=0.12)
        if names:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
