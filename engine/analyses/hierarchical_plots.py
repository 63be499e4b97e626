"""Figures of the hierarchical attention analysis: forest plot of head means per checkpoint
(panels share their x axis) and the shrinkage plot (raw head means against posterior means)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.analyses import _common as C

__all__ = ["plot_forest", "forest_figure", "plot_shrinkage"]


def _layer_legend(fig, num_layers: int) -> None:
    """One legend entry per layer colour, below the panels."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=f"C{layer % 10}", marker="o", ms=4, label=f"layer {layer}")
               for layer in range(num_layers)]
    fig.legend(handles=handles, loc="lower center", ncol=min(num_layers, 8), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.0))


def plot_forest(entropies, draws, labels, hdi_prob, path: Path, max_panels: int = 4, units: str = "nats") -> Path:
    """Forest plot of head means (posterior mean and HDI) per checkpoint, heads grouped by layer;
    the panels share their x axis so checkpoints compare by eye."""
    return C.save_figure(forest_figure(entropies, draws, labels, hdi_prob, max_panels, units), path)


def forest_figure(entropies, draws, labels, hdi_prob, max_panels: int = 4, units: str = "nats"):
    """The figure of :func:`plot_forest` (last ``max_panels`` checkpoints, one panel each)."""
    plt = C.pyplot()
    stats = C.draw_summary(draws["theta"], hdi_prob)
    num_checkpoints, num_layers, num_heads = entropies.shape[:3]
    panels = list(range(num_checkpoints))[-max_panels:]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 1.6 + 0.18 * num_layers * num_heads),
                             sharey=True, sharex=True, squeeze=False)
    names = [f"L{l}.H{h}" for l in range(num_layers) for h in range(num_heads)]
    for ax, c in zip(axes[0], panels):
        for layer in range(num_layers):
            sl = slice(layer * num_heads, (layer + 1) * num_heads)
            idx = np.arange(num_layers * num_heads)[::-1][sl]
            ax.hlines(idx, stats["hdi_low"][c, layer], stats["hdi_high"][c, layer], color=f"C{layer % 10}")
            ax.plot(stats["mean"][c, layer], idx, "o", ms=3, color=f"C{layer % 10}")
        ax.set_title(f"checkpoint {labels[c]}", fontsize=9)
        ax.set_xlabel(f"head mean entropy ({units}), {C.percent(hdi_prob)} HDI", fontsize=8)
    axes[0, 0].set_yticks(np.arange(len(names))[::-1])
    axes[0, 0].set_yticklabels(names, fontsize=6)
    fig.tight_layout(rect=(0, 0.06 if num_layers <= 8 else 0.1, 1, 1))
    _layer_legend(fig, num_layers)
    return fig


def plot_shrinkage(entropies, draws, labels, path: Path, max_panels: int = 4, units: str = "nats") -> Path:
    """Raw per-head sample means vs posterior means: partial pooling pulls heads to their layer."""
    plt = C.pyplot()
    post = np.nanmean(draws["theta"], (-2, -1))  # the kept draws: a stopping run pads with NaN
    raw = entropies.mean(-1)
    panels = list(range(raw.shape[0]))[-max_panels:]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), sharey=True, squeeze=False)
    for ax, c in zip(axes[0], panels):
        for layer in range(raw.shape[1]):
            for h in range(raw.shape[2]):
                ax.plot([0, 1], [raw[c, layer, h], post[c, layer, h]], color=f"C{layer % 10}", lw=0.8, alpha=0.8)
        ax.set_xticks([0, 1])
        ax.set_xticklabels(["sample mean", "posterior mean"])
        ax.set_title(f"checkpoint {labels[c]}", fontsize=9)
    axes[0, 0].set_ylabel(f"head mean entropy ({units})")
    fig.tight_layout(rect=(0, 0.1 if raw.shape[1] <= 8 else 0.16, 1, 1))
    _layer_legend(fig, raw.shape[1])
    return C.save_figure(fig, path)
