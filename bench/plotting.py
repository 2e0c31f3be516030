"""What every benchmark report shares: the end of a plot (labels, grid, legend, PNG) and
the table against the paper."""

from __future__ import annotations

from pathlib import Path


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
