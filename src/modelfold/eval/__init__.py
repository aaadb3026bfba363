"""Evaluation: sweeps of methods x ratios x seeds, latency, tables and plots."""
