"""Files bmsd reads at run time, shipped inside the package.

``bmsd/sql``, ``bmsd/defaults`` and ``bmsd/systemd`` are links to the
repository's top-level ``sql/``, ``config/`` and ``systemd/`` folders, which
stay where operators and the container's init scripts expect them; a built wheel carries their files
(pyproject.toml, package-data), so an installed bmsd works from any folder.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def package_file(*parts: str) -> Path:
    """Return the path of a file or folder shipped inside the bmsd package."""
    # An installed wheel is unpacked on disk, so the resource is a real path.
    return Path(str(importlib.resources.files("bmsd").joinpath(*parts)))
