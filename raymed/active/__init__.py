"""Active learning: which scans to send to annotators next (scoring, then sampling)."""
