"""A status line for long loops: redrawn in place on a terminal, printed as plain lines elsewhere (Slurm logs, pipes).

The training loops' ProgressPrinter (tracking.py) and make-shards' item counter (data/shards.py) both draw through it.
"""

from __future__ import annotations

import shutil
import sys
from typing import TextIO


class StatusLine:
    """Where progress lines go and how: `show(line)` redraws one line on a terminal, else prints the line.

    Args:
        stream: the output stream; None: whatever `sys.stdout` is at each write, so output that a command copies
            into its log by replacing `sys.stdout` (the run's log file) gets the progress lines too.
        tty: force the terminal (True) or line (False) display; None asks the stream.
        width: terminal columns for the status line; None asks the terminal.
    """

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None, width: int | None = None) -> None:
        self._stream = stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.width = width if width is not None else shutil.get_terminal_size(fallback=(120, 24)).columns
        self._line_open = False  # a status line is on screen without its newline

    @property
    def stream(self) -> TextIO:
        """The stream written to now."""
        return sys.stdout if self._stream is None else self._stream

    def show(self, line: str, logged: str | None = None) -> None:
        """Redraw the status line with `line` on a terminal (cut to the width), else print it as a line.

        A stream that copies the output into a log (a run's log file) gets `logged` (default: `line`) for the log
        through its `show_status(shown, logged)`: there every update is a line, whatever the terminal shows.
        """
        if not self.tty:
            print(line, file=self.stream, flush=True)
            return
        shown = "\r" + line[: max(self.width - 1, 20)] + "\x1b[K"  # carriage return, text (a wrapped line cannot
        # be redrawn), erase the rest of the old line
        show_status = getattr(self.stream, "show_status", None)
        if show_status is not None:
            show_status(shown, line if logged is None else logged)
        else:
            self.stream.write(shown)
            self.stream.flush()
        self._line_open = True

    def close(self) -> None:
        """End the status line on a terminal so later output starts on a fresh line."""
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False
