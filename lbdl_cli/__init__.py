"""lbdl: train, evaluate, quantize and sample small language models."""

__version__ = "0.1.0"  # pyproject.toml reads it from here: no importlib.metadata at start-up
