"""Plots (matplotlib, Agg backend: no display needed)."""
