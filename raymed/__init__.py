"""raymed: train, tune and serve medical-imaging anomaly detectors and generators on Ray."""

__version__ = "0.1.0"
