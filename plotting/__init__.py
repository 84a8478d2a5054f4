"""Figures of CKA results."""

from .heatmap import NAN_COLOR, plot_cka_heatmap

__all__ = ["NAN_COLOR", "plot_cka_heatmap"]
