"""Keep TVM's own warnings and log lines out of the user's terminal (``--verbose`` shows them).

TVM's C++ code logs with ``LOG(WARNING)`` straight to file descriptor 2 (e.g. "Fast
mode segfaults when there are out-of-bounds indices", which ``passes.check_indices``
makes moot), and has no switch for it. So while a command runs, fd 2 goes through a
pipe whose reader thread drops TVM's log lines (``[hh:mm:ss] file:line: Warning: ...``)
and passes everything else on unchanged, in order: bscompile's progress and error
lines, compiler messages, TVM errors (raised as exceptions, never dropped).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

#: A TVM log line below error level: "[03:54:31] /path/file.h:1261: Warning: ..." (or no level word).
TVM_LOG_LINE = re.compile(rb"^\[\d\d:\d\d:\d\d\] [^\s:]+:\d+: (?!Error|Fatal|Check failed)")


def _forward(read_fd: int, write_fd: int) -> None:
    pending = b""
    while chunk := os.read(read_fd, 65536):
        *lines, pending = (pending + chunk).split(b"\n")
        out = b"".join(line + b"\n" for line in lines if not TVM_LOG_LINE.match(line))
        if out:
            os.write(write_fd, out)
    if pending and not TVM_LOG_LINE.match(pending):
        os.write(write_fd, pending)
    os.close(read_fd)


@contextmanager
def tvm_logs_hidden() -> Iterator[None]:
    """Drop TVM's warning/info lines on stderr and its Python warnings for the duration."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tvm_logger = logging.getLogger("tvm")
        level = tvm_logger.level
        tvm_logger.setLevel(logging.ERROR)
        sys.stderr.flush()
        saved = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        reader = threading.Thread(target=_forward, args=(read_fd, saved), daemon=True)
        reader.start()
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)  # closes the pipe's last write end: the reader drains and stops
            reader.join(timeout=5)
            os.close(saved)
            tvm_logger.setLevel(level)
