"""stowage: a fast, durable DICOM archive.

Installed, its subpackages sit beside this file (stowage.engine, stowage.workers,
stowage.catalog, stowage.bench, stowage.protocol). In a source checkout they are the repository's
top-level folders, so the package path also names the checkout's root.
"""
from pathlib import Path as _Path

__version__ = "0.1.0"  # the one place it is written: pyproject.toml and the Implementation Version Name read it

_here = _Path(__file__).resolve().parent
if not (_here / "engine").is_dir() and (_here.parent / "engine" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 - a package's __path__
