"""The installed package's version, which store manifests record (set in pyproject.toml only)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lightning-ntk")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
