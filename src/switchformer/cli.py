"""The ``switchformer`` command line: the parser built from :mod:`switchformer.commands` (one module
per subcommand, with its flags, examples and ``run``), and every error turned into one line
(``switchformer: error: ...``; the traceback with ``--debug``)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from switchformer.commands import COMMANDS


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (a flag's bad value, an unknown flag, a missing argument), as
    every other error of the command line, pointing to ``--help`` instead of printing the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="switchformer", description="Switch Transformers in PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(
            command.NAME,
            help=command.HELP,
            description=command.HELP,
            epilog=command.EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    return parser


# The operating system's errors in words a user acts on, where Python's own text is "[Errno 21] Is a
# directory: 'x'": the path first, then what is wrong with it.
_OS_ERRORS = {
    errno.EISDIR: "is a folder; give a file",
    errno.ENOTDIR: "is not a folder (a file is in its way)",
    errno.EEXIST: "already exists; give another path or remove it",
    errno.ENOENT: "no such file or folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "No space left on device",  # the words users search for
    errno.EROFS: "on a read-only file system",
}


def os_error_message(err: Exception) -> str | None:
    """``path: what is wrong`` for an operating-system error that carries Python's raw
    ``[Errno N] ...`` text; None for any other error (messages of our own are kept as they are)."""
    if not isinstance(err, OSError) or err.filename is None or not str(err).startswith("[Errno"):
        return None
    what = _OS_ERRORS.get(err.errno, (err.strerror or "failed").lower())
    return f"{os.fsdecode(err.filename)}: {what}"


def error_message(err: Exception) -> str:
    """One line for ``err``: a known kind as its message, another with its type; under torchrun, the
    rank that says it."""
    # imported for an error only: both need torch, which a plain --help never loads
    from switchformer.parallel.groups import failure_message
    from switchformer.train.trainer import TrainingError

    known = (ValueError, FileNotFoundError, FileExistsError, TrainingError, OSError)
    prefix = "" if isinstance(err, known) else f"{type(err).__name__}: "
    message = failure_message(err) or os_error_message(err) or f"{prefix}{err}"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not message.startswith("rank "):
        message = f"rank {os.environ.get('RANK', '?')}: {message}"  # which of the processes says it
    return message


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("switchformer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): not an error of ours
        sys.stderr.close()
        return 0
    except Exception as err:  # one clear line; the traceback with --debug
        if args.debug:
            raise
        print(f"switchformer: error: {error_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
