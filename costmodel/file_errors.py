"""The error a cost-model input file (a model config, a cost profile) gives: it names the file and the field."""

from __future__ import annotations

import json
from pathlib import Path


class FieldError(ValueError):
    """A file that cannot be read as what it should be; the message names the file (if any) and the field."""

    def __init__(self, path: str | Path | None, field: str | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.field = field
        self.problem = problem
        message = f"field {field!r}: {problem}" if field else problem
        super().__init__(message if path is None else f"{path}: {message}")


def json_text(value: object) -> str:
    """A JSON value as an error message quotes it: whole when short, cut at 60 characters."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
