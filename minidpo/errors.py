"""The two errors minidpo raises on purpose, and how a command turns the user-facing one into an exit status.

  - `UserError`: something the user can act on (a missing file, a wrong option, an unusable tokenizer). Commands
    print it as one line, `minidpo COMMAND: error: MESSAGE`, and exit 2; never a stack trace.
  - `RecordError`: one input record (or the tokenizer's handling of it) cannot be used. Converters write it to
    rejects.jsonl with its line number, `code` as the reason; it becomes a `UserError` only under `--strict`.

Both carry a short machine-readable `code` and a `message` for people. This module imports nothing of minidpo:
every layer may raise them.
"""

from __future__ import annotations

import sys
from typing import Callable

# Exit statuses of a command: argparse already uses 2 for usage errors; 130 is the shell's Ctrl-C.
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """An error the user can act on: printed as one clear line, never as a stack trace.

    `code` names the kind of problem ("missing_path", "bad_option", "bad_config", "bad_tokenizer", "bad_model",
    "bad_data", "bad_checkpoint", "output_dir", "launch"); tests and wrappers may branch on it, people read the message.
    """

    def __init__(self, message: str, code: str = "bad_option"):
        super().__init__(message)
        self.code = code
        self.message = message


class RecordError(ValueError):
    """A record that cannot be used: `code` is short and machine-readable (the reject reason), `message` is for people.

    Raised by record validation (`minidpo.records`) and by masking (`minidpo.masking`), for one record or for a
    tokenizer that cannot score any record (then the caller turns it into a `UserError`).
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self):
        return f"{self.code}: {self.message}"


def exit_status(command: str, call: Callable[[], object]) -> int:
    """Run `call()`: 0 when it returns, 2 with one line on stderr for a `UserError`, 130 on Ctrl-C.

    Anything else keeps its traceback: a bug or a failure during training must show where it happened.
    """
    try:
        result = call()
    except UserError as e:
        print(f"{command}: error: {e.message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
