"""The installed package's version (a bottom module: the mask file, exports and records stamp it)."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("patchsparse")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0+src"
