"""Errors caused by the user's input, and how command-line tools report them.

The project's own errors about configs, data, checkpoints and analysis inputs carry the
:class:`UserError` mixin (beside their usual base, e.g. ValueError). The command-line tools end
with their message on one line and exit status 1; set `RANKDETR_TRACEBACK=1` to get the full
traceback instead. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["UserError", "USER_ERRORS", "report_user_errors"]


class UserError(Exception):
    """Mixin for errors about the user's input; their message names the file, key or value."""


# Missing files are reported as one line too, whatever raised them.
USER_ERRORS = (UserError, FileNotFoundError)


def report_user_errors(main: Callable[..., Any], *args: Any, prefix: str = "error") -> Any:
    """Run main(*args); a user error ends the process with `<prefix>: <message>` on stderr and
    exit status 1, unless RANKDETR_TRACEBACK=1 asks for the traceback."""
    try:
        return main(*args)
    except USER_ERRORS as error:
        if os.environ.get("RANKDETR_TRACEBACK") == "1":
            raise
        message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        print(f"{prefix}: {message}", file=sys.stderr)
        sys.exit(1)
