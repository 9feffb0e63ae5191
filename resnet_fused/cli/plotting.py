"""PNG bar charts of speedups. matplotlib is an optional extra (`pip install resnet_fused[plot]`)."""

from __future__ import annotations

from typing import Dict, List, Sequence

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
              ylabel: str = "speedup vs eager (x)", baseline: float = 1.0) -> None:
    """Grouped horizontal bars: one group per label, one bar per series entry (missing values as NaN)."""
    plt = _pyplot()
    names = list(series)
    height = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.35 * len(labels) * max(len(names), 1) + 1.5)))
    for i, name in enumerate(names):
        positions = [row + i * height for row in range(len(labels))]
        ax.barh(positions, series[name], height=height, label=name)
    ax.set_yticks([row + height * (len(names) - 1) / 2 for row in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(baseline, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel(ylabel)
    ax.set_title(title, fontsize=9)
    if len(names) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
