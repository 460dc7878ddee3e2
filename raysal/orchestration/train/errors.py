"""Bad input → one line for the user. The entry points print ``error: <line>`` and exit 2 for these errors.

Validation happens once, before Ray starts (`raysal.orchestration.train.spec`, `raysal.orchestration.train.preflight`);
what the workers see is trusted.
"""

from __future__ import annotations

import re
import sys

from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException

from raysal.search.space import SearchSpaceError


class ConfigError(ValueError):
    """A config value, a file or a folder the run cannot use; the message names the key or file and the reason."""


def first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def _options(text: str) -> list[str]:
    """The 'Available options in ...' block of a Hydra MissingConfigException."""
    lines = text.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
    except StopIteration:
        return []
    out = []
    for ln in lines[start + 1 :]:
        if not ln.startswith("\t"):
            break
        out.append(ln.strip())
    return out


def user_message(e: BaseException) -> str | None:
    """One line for an input error (config, Hydra composition, search space, data, model, storage); None for
    anything else, which is a bug or an infrastructure failure and keeps its traceback."""
    text = str(e)
    if isinstance(e, MissingConfigException):
        m = re.search(r"Could not find '([^']+)'", text)
        what = m.group(1) if m else first_line(text)
        options = _options(text)
        avail = f" (available: {', '.join(options)})" if options else ""
        return f"{what}: no such config option{avail}"
    if isinstance(e, HydraException):
        m = re.search(r"Could not override '([^']+)'", text)
        if m and "not in struct" in str(e.__cause__ or ""):
            key = m.group(1)
            return f"{key}: no such config key (a typo? to add a new key on purpose, write +{key}=...)"
        cause = f" ({first_line(str(e.__cause__))})" if e.__cause__ else ""
        return f"config: {first_line(text)}{cause}"
    if isinstance(e, OmegaConfBaseException):
        return f"config: {first_line(text)}"
    if isinstance(e, ConfigError | SearchSpaceError | ValueError | FileNotFoundError | PermissionError):
        return " ".join(text.split())  # one line, whatever the message looked like
    return None


def print_user_error(e: BaseException) -> int:
    """For an entry point's ``except``: bad input → one ``error:`` line on stderr and exit code 2; anything else is
    raised again with its traceback."""
    message = user_message(e)
    if message is None:
        raise e
    print(f"error: {message}", file=sys.stderr)
    return 2
