"""Benchmarks behind `scaleseg bench ...`: each measures in fresh processes and writes JSON, Markdown and a plot."""
