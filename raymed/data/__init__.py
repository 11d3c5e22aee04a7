"""Volumes, datasets, preprocessing and the built-in demo cohort."""
