"""The process around a command: standard streams, signals and exit codes, set up once for every command.

- Streams closed at start (`<&-`, `>&-`, `2>&-`, as cron and some daemons run
  programs): Python leaves sys.stdin/stdout/stderr as None and the next file
  opened would take the free descriptor, so a stray write to fd 1 or 2
  (TensorFlow's C++ log, for one) would land in an output file. Each closed
  descriptor is filled with /dev/null first. stdin then reads as empty and
  stderr as a sink (the exit code still says what happened); stdout stays
  None, so a command whose data goes to stdout fails with the reason
  (`data_stdout`).
- Names that are not UTF-8 travel as surrogateescape strings: stdout writes
  their exact bytes (data); stderr shows those bytes as \\xNN (messages).
- SIGTERM and SIGHUP (`timeout`, systemd, Kubernetes, Ray, a closed terminal)
  end a command as Ctrl-C does: its `finally` blocks run, staged output is
  kept, one line says how to resume, exit 128 + the signal (143, 129).
  Remote reads never hold this up: they run on fsspec's IO loop, and the
  main thread only waits for them, so the interrupt lands in that wait and
  cancels them (`images.sources.fetch_ahead`); their images are not done.
- A reader that goes away (`vggembed classify dir/ | head -1`) ends the
  command quietly with 141, the status a shell gives a program killed by
  SIGPIPE, so `set -o pipefail` scripts see the usual code.
"""

from __future__ import annotations

import codecs
import errno
import io
import os
import signal
import sys

import click

EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C)
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE
ERRORS = "vggembed-escape"  # the stderr error handler: undecodable name bytes as \xNN
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """A termination signal, raised in the main thread like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def exit_code(interrupt: KeyboardInterrupt) -> int:
    return 128 + interrupt.signum if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED


def interrupted_line(interrupt: KeyboardInterrupt) -> str:
    if isinstance(interrupt, Terminated):
        return f"vggembed: stopped by {signal.Signals(interrupt.signum).name}"
    return "vggembed: interrupted"


def _escape(err: UnicodeError):
    """Surrogate-escaped bytes (names that are not UTF-8) as \\xNN; anything else as backslashreplace does."""
    bad = err.object[err.start: err.end]
    if isinstance(err, UnicodeEncodeError) and all(0xDC80 <= ord(c) <= 0xDCFF for c in bad):
        return "".join(f"\\x{ord(c) - 0xDC00:02x}" for c in bad), err.end
    return codecs.backslashreplace_errors(err)


codecs.register_error(ERRORS, _escape)


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
        return False
    except OSError as e:
        return e.errno == errno.EBADF


def prepare_streams() -> None:
    """Fill closed standard descriptors with /dev/null; set how each stream writes names."""
    for fd, mode in ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY)):
        if _closed(fd):
            null = os.open(os.devnull, mode)
            if null != fd:  # the lowest free descriptor is normally this one already
                os.dup2(null, fd)
                os.close(null)
    if sys.stdin is None:
        sys.stdin = open(0, encoding="utf-8", errors="surrogateescape", closefd=False)  # noqa: SIM115
    if sys.stderr is None:
        sys.stderr = open(2, "w", encoding="utf-8", errors=ERRORS, buffering=1, closefd=False)  # noqa: SIM115
    elif isinstance(sys.stderr, io.TextIOWrapper):
        sys.stderr.reconfigure(errors=ERRORS)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")


def data_stdout():
    """sys.stdout for a command's data; a ClickException when the process started with stdout closed."""
    if sys.stdout is None:
        raise click.ClickException("standard output is closed, so there is nowhere to write the results: "
                                   "redirect it to a file (> FILE) or use -o where the command has it")
    return sys.stdout


def _raise_terminated(signum, _frame):
    signal.signal(signum, signal.SIG_DFL)  # a second signal while cleaning up ends the process at once
    raise Terminated(signum)


def handle_signals() -> None:
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is signal.SIG_DFL:  # an ignored SIGHUP (nohup) stays ignored
            signal.signal(sig, _raise_terminated)


def quiet_broken_pipe() -> None:
    """After the reader of stdout went away: no more writes there (nor Python's complaint at exit)."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
