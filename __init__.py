"""pdserve: disaggregated LLM serving (prefill and decode on separate GPU pools).

The repository root is this package: ``pyproject.toml`` maps ``pdserve`` onto it
(``package-dir``), so ``kernels/`` installs and imports as ``pdserve.kernels``, and no bare
top-level name (``kernels``, ``engine``, ``router``, ...) reaches ``sys.modules``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pdserve")
except PackageNotFoundError:  # a source tree put on sys.path by hand, not installed
    __version__ = "0+unknown"
