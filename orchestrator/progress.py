"""What a study tells whoever shows its progress: the protocol, with a do-nothing default.

The study's runners (orchestrator/session.py and the study kinds) call these methods on the progress object they
are given, whatever it is: :class:`Progress` does nothing (a library caller who wants no console), the CLI's
:class:`~orchestrator.console.StudyConsole` draws the live view. A progress object that is also a Tune callback
is given to Tune with the study's other callbacks (it sees every trial's events).
"""

from __future__ import annotations

from typing import Optional


class Progress:
    """The do-nothing progress: every method is a no-op."""

    def note(self, text: str) -> None:
        """A line of the study's own (which Ray it runs on, caches built, the memory plan, what it waits for)."""

    def expect(self, stage: str, trials: list[tuple[str, str, Optional[int]]], concurrency: int,
               done_before: Optional[set] = None, total: Optional[int] = None) -> None:
        """The next stage's trials: (trial key, display name, epochs or None), how many run at once, the keys a
        resumed study had finished (``done_before``) and, for a stage whose trials are not known in advance (a
        search), how many there will be (``total``)."""

    def close(self) -> None:
        """The study is over (or stopped): stop drawing."""
