"""A text stream that says whether it is a terminal: the progress displays draw differently on one."""

from __future__ import annotations

import io


class FakeStream(io.StringIO):
    """StringIO with a chosen isatty()."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty
