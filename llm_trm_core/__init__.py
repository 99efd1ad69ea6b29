"""llm-trm core: models, data and artifact IO for Tiny Recursive Models over LM hidden states.

This package never imports prefect; orchestration lives in `tasks/` and `flows/`.
Importing it configures nothing (no logging handlers, no environment changes).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llm-trm")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
