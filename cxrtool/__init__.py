"""cxrtool: chest X-ray deep learning with explainability at its heart."""

__version__ = "0.1.0"
