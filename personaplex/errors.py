"""Errors whose message is meant for the person using the app or the command line.

Implements `UserError`, the base of every problem that person can fix (a file that is not
audio, a setting out of range, a missing checkpoint, every slot taken), `SettingsError` and
`Busy`. The app and the CLI show these messages as they are and log one line; any other
exception is a fault in the program and is logged with its traceback. The ground floor of the
three wings (`model` raises the first two, `runtime` the third); `serve.contract` hands them on.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the person can fix; the message says what is wrong and what to do."""


class SettingsError(UserError):
    """A setting of the wrong type or out of its range."""


class Busy(UserError):
    """No free conversation slot."""
