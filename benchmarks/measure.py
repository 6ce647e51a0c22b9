"""Run a command and read its process tree's wall time, CPU time and peak memory, and nothing of ours.

`ru_maxrss` from `wait4` is the peak of the child and every child it waited for, but Linux starts a child's
count at the resident size of the process that forked it (exec keeps the old memory's high-water mark), so a
benchmark that has grown to 600 MB reports 600 MB for `vggembed --help`. Here the command is started by a
small launcher (the standard library only, about 12 MB) that times it and reports its rusage on a pipe:
the figures are the command's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

LAUNCHER = """
import json, os, subprocess, sys, time
fd, cmd = int(sys.argv[1]), sys.argv[2:]
start = time.perf_counter()
p = subprocess.Popen(cmd)
_, status, usage = os.wait4(p.pid, 0)
wall = time.perf_counter() - start
code = os.waitstatus_to_exitcode(status)
os.write(fd, json.dumps([code, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024]).encode())
sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass
class Measured:
    returncode: int  # negative: killed by that signal
    wall: float  # seconds from the command's start to its exit
    cpu: float  # user + system seconds of the command and every child it waited for
    peak_mib: float  # the largest resident size among them


class Launch:
    """`Launch(cmd, **popen)` starts cmd (Popen's keywords: env, cwd, stdin, stdout, stderr, preexec_fn ...);
    `.proc` is the launcher, whose stdin/stdout/stderr are the command's; `.wait()` returns `Measured`."""

    def __init__(self, cmd, **popen):
        read, write = os.pipe()
        self._read = read
        try:
            self.proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(write), *map(str, cmd)],
                                         pass_fds=(write,), **popen)
        finally:
            os.close(write)

    def wait(self) -> Measured:
        self.proc.wait()
        with os.fdopen(self._read, "rb") as f:
            report = f.read()
        if not report:
            raise RuntimeError(f"the launcher itself failed (exit {self.proc.returncode})")
        return Measured(*json.loads(report))


def measure(cmd, **popen) -> Measured:
    return Launch(cmd, **popen).wait()
