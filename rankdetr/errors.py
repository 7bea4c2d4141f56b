"""Errors caused by the user's input, and how command-line tools report them.

The project's own errors about configs, data, checkpoints and analysis inputs carry the
:class:`UserError` mixin (beside their usual base, e.g. ValueError). The command-line tools end
with their message on one line and exit status 1; set `RANKDETR_TRACEBACK=1` to get the full
traceback instead. Anything else (a bug) keeps its traceback. A user error raised in a
DataLoader worker process is reported the same way: torch re-raises it in the main process
with the worker's traceback inside its message, which the one line leaves out.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["UserError", "USER_ERRORS", "is_user_error", "report_user_errors", "user_message"]


class UserError(Exception):
    """Mixin for errors about the user's input; their message names the file, key or value."""


# Missing files are reported as one line too, whatever raised them.
USER_ERRORS = (UserError, FileNotFoundError)


def report_user_errors(main: Callable[..., Any], *args: Any, prefix: str = "error") -> Any:
    """Run main(*args); a user error ends the process with `<prefix>: <message>` on stderr and
    exit status 1, unless RANKDETR_TRACEBACK=1 asks for the traceback.

    A user error raised in a DataLoader worker process counts too: torch re-raises it in the
    main process with the worker's traceback in its message, and only the original message is
    printed."""
    try:
        return main(*args)
    except Exception as error:
        if not is_user_error(error) or os.environ.get("RANKDETR_TRACEBACK") == "1":
            raise
        print(f"{prefix}: {user_message(error)}", file=sys.stderr)
        sys.exit(1)


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is about the user's input, also when torch re-raised it from a worker
    as a RuntimeError (because its class could not be rebuilt from the message alone)."""
    if isinstance(error, USER_ERRORS):
        return True
    original = _from_worker(error)
    return original is not None and original[0] is not None and issubclass(original[0], USER_ERRORS)


def user_message(error: BaseException) -> str:
    """The one-line message of a user error: a KeyError's text without repr quotes, and for an
    error from a DataLoader worker the original message without the worker's traceback."""
    original = _from_worker(error)
    if original is not None:
        return original[1]
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


# torch's ExceptionWrapper.reraise() builds the main process's error from the worker's as
#   "Caught <Name> in DataLoader worker process <n>.\nOriginal Traceback (most recent ...):\n
#    <the worker's traceback, ending with '<module>.<Name>: <message>'>"
_WORKER_HEADER = re.compile(
    r"\ACaught (?P<name>\w+) in (?P<where>[^\n]*)\.\n"
    r"Original Traceback \(most recent call last\):\n"
)


def _from_worker(error: BaseException) -> tuple[type | None, str] | None:
    """(the original class, its message) of an error that torch re-raised from a DataLoader
    worker (or its pin-memory thread); None for any other error. The class is None when it
    cannot be found (it is looked up among the imported modules, never imported)."""
    text = error.args[0] if error.args and isinstance(error.args[0], str) else ""
    header = _WORKER_HEADER.match(text)
    if header is None:
        return None
    name = re.escape(header.group("name"))
    # The last line naming the class starts the final exception of the chain: its message
    # runs to the end (a message may span lines; Python may add notes after it).
    last_lines = list(re.finditer(rf"^(?P<qualified>(?:\w+\.)*{name})(?:: |$)", text, re.M))
    if not last_lines:
        return None
    last = last_lines[-1]
    message = text[last.end() :].strip()
    return _loaded_class(last.group("qualified")), message


def _loaded_class(qualified: str) -> type | None:
    """The class named `module.Name` (or a builtin `Name`) if its module is already imported."""
    module_name, _, name = qualified.rpartition(".")
    value = getattr(sys.modules.get(module_name or "builtins"), name, None)
    return value if isinstance(value, type) else None
