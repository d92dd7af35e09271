"""longtail-pipeline: long-tailed image recognition, from dataset to comparison table."""

__version__ = "0.1.0"
