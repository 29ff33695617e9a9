"""A stand-in for a run's log that keeps the warnings it is given, for the tests to read."""

from __future__ import annotations


class WarningLog:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, object]]] = []

    def warning(self, event: str, **fields: object) -> None:
        self.warnings.append((event, fields))
