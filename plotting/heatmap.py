"""CKA heatmaps: one figure per pair of models, readable with hundreds of layers."""

import math
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

__all__ = ["NAN_COLOR", "plot_cka_heatmap"]

NAN_COLOR = "#9e9e9e"
"""Grey for undefined cells; the magma colour map has no grey."""

# Tick labels per axis before they are thinned to every k-th layer.
_MAX_TICKS = 40
# Figure side in inches: grows with the layer count between these bounds.
_MIN_SIDE, _MAX_SIDE, _INCHES_PER_LAYER = 6.0, 16.0, 0.16


def _tick_positions(count: int) -> np.ndarray:
    step = max(1, math.ceil(count / _MAX_TICKS))
    return np.arange(0, count, step)


def _side(count: int) -> float:
    return min(_MAX_SIDE, max(_MIN_SIDE, 2.5 + _INCHES_PER_LAYER * count))


def plot_cka_heatmap(
    matrix: np.ndarray,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    title: str,
    row_axis: str = "",
    column_axis: str = "",
) -> Figure:
    """Draw a CKA matrix as a heatmap and return the figure.

    Row 0 sits at the bottom and column 0 at the left, so the diagonal of a
    self-comparison runs from the lower left to the upper right. Colours span [0, 1]:
    negative values (possible with the unbiased estimator) are drawn as 0, with an arrow
    on the colour bar and the minimum in its label. NaN cells are grey, and the colour bar
    label counts them when there are any. When an axis
    has more than 40 layers, every k-th tick label is shown.

    Args:
        matrix: ``(rows, columns)`` CKA values.
        row_labels: one name per row, in order.
        column_labels: one name per column, in order.
        title: figure title.
        row_axis: label of the vertical axis, such as the rows' model name.
        column_axis: label of the horizontal axis.

    Returns:
        The matplotlib figure, not registered with pyplot: save it with ``savefig``, or
        let a notebook display it.
    """
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (len(row_labels), len(column_labels)):
        raise ValueError(
            f"matrix shape {matrix.shape} does not match {len(row_labels)} row labels "
            f"and {len(column_labels)} column labels"
        )
    rows, columns = matrix.shape
    # A Figure outside pyplot needs no display and leaves the user's backend alone.
    figure = Figure(figsize=(_side(columns) + 2.0, _side(rows)), layout="constrained")
    axes = figure.add_subplot()

    colour_map = matplotlib.colormaps["magma"].with_extremes(bad=NAN_COLOR)
    image = axes.imshow(
        np.ma.masked_invalid(matrix),
        origin="lower",
        cmap=colour_map,
        vmin=0.0,
        vmax=1.0,
        aspect="auto",
        interpolation="nearest",
    )
    finite = matrix[np.isfinite(matrix)]
    below_zero = finite.size > 0 and finite.min() < 0
    colour_bar = figure.colorbar(
        image, ax=axes, fraction=0.05, pad=0.02, extend="min" if below_zero else "neither"
    )
    notes = []
    if below_zero:
        # The unbiased estimator goes below 0 for unrelated layers and small batches.
        notes.append(f"values down to {finite.min():.2f} drawn as 0")
    nan_cells = int(np.isnan(matrix).sum())
    if nan_cells:
        notes.append(f"grey: {nan_cells} undefined cells")
    colour_bar.set_label("CKA" + (f"  ({'; '.join(notes)})" if notes else ""))

    font_size = 8 if max(rows, columns) <= _MAX_TICKS else 6
    x_ticks = _tick_positions(columns)
    y_ticks = _tick_positions(rows)
    axes.set_xticks(x_ticks, [column_labels[i] for i in x_ticks], rotation=90, fontsize=font_size)
    axes.set_yticks(y_ticks, [row_labels[i] for i in y_ticks], fontsize=font_size)
    axes.set_xlabel(column_axis)
    axes.set_ylabel(row_axis)
    axes.set_title(title)
    return figure
