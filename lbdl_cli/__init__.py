"""lbdl: train, evaluate, quantize and sample small language models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lbdl")
except PackageNotFoundError:  # running from a checkout that is not installed
    __version__ = "0.0.0+local"
