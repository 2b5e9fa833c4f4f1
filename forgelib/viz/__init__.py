"""Plots (functions returning matplotlib figures) and ipywidgets inspectors for the notebooks."""
from .plots import plot_history, plot_phase_durations, plot_metric_rows
from .widgets import result_browser

__all__ = ["plot_history", "plot_phase_durations", "plot_metric_rows", "result_browser"]
