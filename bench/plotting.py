"""What every benchmark report shares: a plot's figure and its end (labels, grid,
legend, PNG), the table against the paper, and the closing lines (floor, plot)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def figure():
    """A new (fig, ax) drawn off screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def log_axes(ax, ticks: list[int], names: list[str], base: int = 2) -> None:
    """Log scales both ways, with ``ticks`` named on the x axis (and no minor labels)."""
    import matplotlib.ticker

    ax.set_xscale("log", base=base)
    ax.set_yscale("log")
    ax.set_xticks(ticks, names)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def save(fig, ax, out: Path, *, title: str, xlabel: str, ylabel: str) -> Path:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def paper_table(rows: list[tuple[str, str, str, str]]):
    """The table every benchmark ends with: figure, the paper's, ours, ratio."""
    from rich.table import Table

    t = Table(title="against the paper")
    for col in ("figure", "paper", "ours", "x paper"):
        t.add_column(col)
    for row in rows:
        t.add_row(*row)
    return t


def verdict(met: bool) -> str:
    return "[green]met[/green]" if met else "[red]not met[/red]"


def finish(result: dict, console, plot_path: Path | None,
           draw: Callable[[Path], Path]) -> dict:
    """Draw the plot when asked, name it in the result and on the console."""
    if plot_path is not None:
        result["plot"] = str(draw(plot_path))
        console.print(f"plot: {result['plot']}")
    return result
