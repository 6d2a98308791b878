"""Reading the project's YAML files (RAPID options, ARM profiles) with errors that name the file and its role."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def read_yaml(path: str | os.PathLike[str], what: str, error: type[Exception]) -> Any:
    """Parse ``path``; a missing file or bad syntax raises ``error`` saying which ``what`` it was."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML: {exc}") from exc
