"""Errors that reach users as one line naming the file and the problem.

:class:`InputError` is what the library raises for bad input. :func:`describe_failure` is the command line's
error boundary (:class:`mdgru_keras.cli.LazyGroup`): it turns every *expected* failure into one line
``"PATH: problem"`` and leaves anything else (a bug) alone, so that it still shows its traceback. Expected:

* :class:`InputError` and :class:`mdgru_keras.config.ConfigError` (a bad config file or key);
* :class:`OSError`: a file that cannot be read or written (``--out`` in a read-only folder, under a regular
  file, an existing directory), a full disk, an unreachable host;
* :class:`mdgru_keras.serving.ServingError` (the server refused or could not answer) and
  :class:`mdgru_keras.data.demo.DownloadError`;
* running out of memory: :class:`MemoryError` and TensorFlow's ``ResourceExhaustedError``.

Messages are condensed to one line by :func:`one_line`, or by :func:`one_line_tf_error` for TensorFlow's
multi-line error messages (it also drops their node and stack-trace decoration).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


class InputError(ValueError):
    """Bad input: an unreadable, malformed or inconsistent file. ``str(error)`` is ``"PATH: problem"``."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


# Expected failures defined in modules that the command line imports only when needed: (module, class name).
# A module that was never imported cannot have raised its error, so they are looked up in sys.modules only.
_LAZY_EXPECTED = (
    ("mdgru_keras.config", "ConfigError"),
    ("mdgru_keras.serving", "ServingError"),
    ("mdgru_keras.data.demo", "DownloadError"),
)


def one_line(text: str) -> str:
    """``text`` on one line: its non-empty lines, stripped, joined by ``"; "``."""
    lines = [line.strip() for line in str(text).splitlines()]
    return "; ".join(line for line in lines if line)


_TF_NOISE_LINE = re.compile(
    r"^(Graph execution error:|Detected at node .*|<stack traces unavailable>|\s*\[\[\{\{.*|"
    r"\s*File \".*|\s*\[\[.*\]\]\s*)$"
)
_TF_OP_SUFFIX = re.compile(r"\s*\[Op:[^\]]*\]\s*$")
_TF_ASSERTION = re.compile(r"^assertion failed: \[([^\]]*)\]\s*")


def one_line_tf_error(message: str) -> str:
    """Condense a TensorFlow error message to one readable line (:func:`one_line` for TensorFlow's messages).

    Drops TensorFlow's node and stack-trace decoration ("Graph execution error:", "Detected at node ...",
    "[[{{node ...}}]]", "[Op:...]") and puts an assertion's own message first; ``"no message"`` when nothing
    is left.
    """
    lines = [_TF_OP_SUFFIX.sub("", line).strip() for line in str(message).splitlines()]
    kept = [line for line in lines if line and not _TF_NOISE_LINE.match(line)]
    text = "; ".join(kept) if kept else " ".join(line for line in lines if line)
    return _TF_ASSERTION.sub(r"\1 (assertion failed) ", text).strip() or "no message"


def _os_error_text(error: OSError) -> str:
    problem = error.strerror or str(error)
    if error.filename is None:
        return str(error) if error.strerror is None else problem
    if error.filename2 is not None:
        return f"{error.filename} -> {error.filename2}: {problem}"
    return f"{error.filename}: {problem}"


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    tensorflow = sys.modules.get("tensorflow")
    errors = getattr(tensorflow, "errors", None)
    return errors is not None and isinstance(error, errors.ResourceExhaustedError)


def describe_failure(error: BaseException) -> str | None:
    """One line ``"PATH: problem"`` for an expected failure (module docstring), ``None`` for anything else."""
    if isinstance(error, InputError):
        return one_line(str(error))
    if _is_out_of_memory(error):
        detail = one_line_tf_error(getattr(error, "message", None) or str(error)) if str(error) else ""
        return f"out of memory ({type(error).__name__}{': ' + detail if detail else ''})"
    if isinstance(error, OSError):
        return one_line(_os_error_text(error))
    for module_name, class_name in _LAZY_EXPECTED:
        expected = getattr(sys.modules.get(module_name), class_name, None)
        if expected is not None and isinstance(error, expected):
            return one_line(str(error))
    return None
