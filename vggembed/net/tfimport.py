"""Import TensorFlow once, quietly.

TensorFlow prints start-up lines (oneDNN notes, "could not find cuda
drivers", cuInit errors) straight to file descriptor 2 before its logging is
set up, so no environment variable hides them. They are silenced here unless
VGGEMBED_VERBOSE is set (the CLI's -v does that).
"""

from __future__ import annotations

import contextlib
import os
import sys

_tf = None


def tensorflow():
    """The tensorflow module, imported on first use."""
    global _tf
    if _tf is None:
        quiet = not os.environ.get("VGGEMBED_VERBOSE")
        with _silenced_stderr() if quiet else contextlib.nullcontext():
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if quiet else "0")
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")  # device probing prints too
            if quiet:  # e.g. retracing notes when a program loads several models
                tf.get_logger().setLevel("ERROR")
        _tf = tf
    return _tf


@contextlib.contextmanager
def _silenced_stderr():
    if sys.stderr is not None:  # None: a program started with stderr closed
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # fd 2 closed: nothing to silence (the vggembed command fills it with /dev/null first)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512_BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
