"""sigprop's console plumbing: the one-line argparse errors and help layout, -q/-v, and
standard streams that fail (a closed pipe, a full disk, an encoding) without a traceback.

Standard library only, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from typing import TextIO

from sigprop.errors import UserError, did_you_mean


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we want one line
        import re

        if message.startswith("unrecognized arguments") and re.search(
                r"(^|\s)(-v+|--verbose)(\s|$)", message.split(":", 1)[1]):
            message += f" (-v/--verbose is taken by {', '.join(VERBOSE_HELP)})"
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _check_value(self, action: argparse.Action, value) -> None:
        # argparse's own check, with the did-you-mean every other name gets (`modles`)
        choices = action.choices
        if choices is not None and value not in choices:
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r}{did_you_mean(value, choices)} (choose from "
                f"{', '.join(map(repr, choices))})")

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        args, extras = self.parse_known_args(args, namespace)
        if extras:  # the closest option of the command given (`--dryrun`: --dry-run)
            commands = getattr(self, "commands", {})
            parser = commands.get(getattr(args, "command", None), self)
            flags = [flag for action in parser._actions for flag in action.option_strings]
            first = next((word for word in extras if word.startswith("-")), "")
            hint = did_you_mean(first.split("=", 1)[0], flags) if first else ""
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return args


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples keep their line breaks; an option with a default says it (unless its help
    already does, or the default is "off")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        off = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if "default" in text or off or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def package_version() -> str:
    """The installed distribution's version, else the source tree's."""
    from importlib import metadata

    try:
        return metadata.version("sigprop")
    except metadata.PackageNotFoundError:
        from sigprop import __version__

        return __version__


class VersionAction(argparse.Action):
    """--version: the metadata is looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog} {package_version()}")
        parser.exit()


class OutputLost(KeyboardInterrupt):
    """Standard output failed (``| head`` closed the pipe, ``> /dev/full``). A
    KeyboardInterrupt, so a grid stops as on Ctrl-C: the runs in flight store themselves as
    queued and the next invocation resumes them. ``note``: what became of the grid."""

    def __init__(self, error: OSError, note: str = "") -> None:
        super().__init__(error)
        self.error, self.note = error, note


class GuardedStream:
    """``sys.stdout`` or ``sys.stderr`` while a command runs.

    Text the stream's encoding cannot hold (a grid named "grille-é" under
    PYTHONIOENCODING=ascii) is written with backslash escapes instead of raising. The first
    write that fails points the file descriptor at /dev/null (so the interpreter's flush at
    exit says nothing more) and, on stdout (``fatal``), raises :class:`OutputLost`; whatever
    is written after that is dropped."""

    def __init__(self, stream: TextIO, fatal: bool) -> None:
        self.stream, self.fatal = stream, fatal
        self.lost: OSError | None = None

    def write(self, text: str) -> int:
        if self.lost is None:
            self._guard(self._write, text)
        return len(text)

    def flush(self) -> None:
        if self.lost is None:
            self._guard(self.stream.flush)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
        except UnicodeEncodeError:  # raised before anything is buffered: write it escaped
            encoding = self.stream.encoding or "ascii"
            self.stream.write(text.encode(encoding, "backslashreplace").decode(encoding))

    def _guard(self, call, *args) -> None:
        try:
            call(*args)
        except OSError as err:
            self.lost = err
            self._to_devnull()
            if self.fatal:
                raise OutputLost(err) from None

    def _to_devnull(self) -> None:
        try:
            fd = self.stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
        except (OSError, ValueError):  # not a file (a test's StringIO)
            return
        try:
            os.dup2(null, fd)
        except OSError:
            pass
        finally:
            os.close(null)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


@contextlib.contextmanager
def guarded_streams() -> Iterator[GuardedStream]:
    """sys.stdout and sys.stderr as :class:`GuardedStream` for the body (stdout yielded)."""
    out, err = GuardedStream(sys.stdout, fatal=True), GuardedStream(sys.stderr, fatal=False)
    sys.stdout, sys.stderr = out, err  # type: ignore[assignment]
    try:
        yield out
    finally:
        sys.stdout, sys.stderr = out.stream, err.stream


def fd_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def reserve_closed_fds() -> bool:
    """Put /dev/null on a closed stdin or stderr (else the next file opened, a store's, would
    get that number and a child's stray output would land in it); True if stdout is closed."""
    for fd in (0, 2):
        if fd_closed(fd):
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if fd == 2:
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - for the process
    return sys.stdout is None  # how Python starts with fd 1 closed


def output_lost(error: OSError, note: str = "") -> int:
    """The one line for a standard output that failed; 141 (as a shell reports a process
    ended by SIGPIPE) for a closed pipe, 1 for anything else (a full disk)."""
    why = error.strerror or str(error)
    print(f"sigprop: error: cannot write to standard output ({why})"
          f"{'; ' + note if note else ''}", file=sys.stderr)
    return 141 if error.errno == errno.EPIPE else 1


def verbosity(args: argparse.Namespace) -> int:
    """-1 with --quiet, 0 by default, 1 (or more) with --verbose."""
    if args.quiet and args.verbose:
        raise UserError("give -q/--quiet or -v/--verbose, not both")
    return -1 if args.quiet else args.verbose


def say(args: argparse.Namespace, line: str) -> None:
    """An informational line: printed unless --quiet."""
    if verbosity(args) >= 0:
        print(line)


# what -v adds, on the commands where it adds something
VERBOSE_HELP = {
    "run": "more detail: every run's start and end line also on a terminal",
    "quickstart": "more detail: every run's start and end line also on a terminal",
    "frontier": "more detail: every probe run's start and end line",
    "export": "more detail: every run folder written",
    "coord-check": "more detail: a line per model and width done",
}


def add_verbosity(parser: argparse.ArgumentParser, top: bool, command: str = "") -> None:
    # on the subcommands too (`sigprop run GRID -q`); there a flag not given keeps the top
    # level's value instead of overwriting it
    keep = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print only errors, warnings and the tables asked for",
                        **({"default": False} if top else keep))
    if top:
        parser.add_argument("-v", "--verbose", action="count", default=0,
                            help=f"more detail (for {', '.join(VERBOSE_HELP)})")
    elif command in VERBOSE_HELP:
        parser.add_argument("-v", "--verbose", action="count", help=VERBOSE_HELP[command],
                            **keep)



def check_output(note: str) -> None:
    """:class:`OutputLost` with ``note`` if standard output failed (what stopped the grid)."""
    lost = getattr(sys.stdout, "lost", None)
    if lost is not None:
        raise OutputLost(lost, note)

