"""Metrics, post-processing and reports."""
