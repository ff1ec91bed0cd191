"""What the user sees: fusion-etl's own lines on the console, everything else in a log file.

`log` prints one `[fusion-etl] ...` line. `routed_output` (the CLI's `run`, `demo`, `submit`)
sends every other write to stdout/stderr (Ray's startup lines and warnings such as `Failed to
query Ray Train Controller actor state`, the lines Ray forwards from its workers, library
progress bars such as `Loading weights` or Ray Data's) to a log file instead. Lines that start
with `[fusion-etl]` stay on the console whether this process or any Ray worker printed them:
Ray forwards a worker's line as `(Name pid=N, ip=...) text`, and for ours the prefix is
dropped. Lines this process prints to stdout without such a prefix (the evaluation table, the
status) stay on the console too. With `verbose`, everything is shown as it comes (and logged).

`StageProgress` is one stage's (or one model's) progress: a bar on a terminal, a line every
30 s elsewhere (job logs), and one summary line at the end.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, TextIO

from fusion_etl.config import redact
from fusion_etl.redaction import scrub

__all__ = ["PREFIX", "StageProgress", "detail", "log", "routed_output"]

PREFIX = "[fusion-etl]"
# How often a progress line is printed when the console is not a terminal.
PROGRESS_EVERY_S = 30.0

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Ray's prefix of a forwarded worker line: `(pid=1)`, `(RayTrainWorker pid=1, ip=10.0.0.2)`,
# `(raylet)`, `(autoscaler +1m2s)`.
_FORWARDED = re.compile(r"^\s*\((?:[^()]*\bpid=\d+[^()]*|raylet[^()]*|autoscaler[^()]*)\)\s?(.*)$")


def _last_state(text: str) -> str:
    """A line redrawn with "\r" (a progress bar) as its last state, after the worker's prefix
    if Ray forwarded it."""
    if "\r" not in text:
        return text
    forwarded = _FORWARDED.match(_ANSI.sub("", text))
    if forwarded is None:
        return text.rsplit("\r", 1)[-1]
    clean = _ANSI.sub("", text)
    return clean[: forwarded.start(1)] + forwarded.group(1).rsplit("\r", 1)[-1]


def log(msg: str) -> None:
    """One line for the user (and the log file), on stderr."""
    print(scrub(f"{PREFIX} {msg}"), file=sys.stderr, flush=True)


def detail(msg: str) -> None:
    """One line for the log file only (the console too with --verbose or without routing)."""
    router = _active
    if router is None or router.verbose:
        log(msg)
        return
    router.to_file(scrub(f"{PREFIX} {msg}"))


class _Router(io.TextIOBase):
    """A stand-in for sys.stdout or sys.stderr that sorts whole lines into console or file."""

    def __init__(
        self,
        console: TextIO,
        file: IO[str],
        path: Path,
        lock: threading.Lock,
        *,
        own_to_console: bool,
    ) -> None:
        super().__init__()
        self.console = console
        self.file: IO[str] | None = file
        self.path = path
        self.lock = lock
        self.own_to_console = own_to_console
        self.verbose = False
        self._buf = ""

    # io.TextIOBase API -------------------------------------------------------------------
    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.console, "encoding", "utf-8") or "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False  # libraries then print plain lines, no cursor tricks

    def fileno(self) -> int:
        return self.console.fileno()

    def write(self, text: str) -> int:
        with self.lock:
            if self.verbose:
                self.console.write(text)
            self._buf += text
            *lines, self._buf = self._buf.split("\n")
            # A progress bar redraws with "\r" and may never end its line: keep its last state.
            self._buf = _last_state(self._buf)
            for line in lines:
                self._route(line)
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(Exception):
            self.console.flush()
            if self.file is not None:
                self.file.flush()

    # routing -----------------------------------------------------------------------------
    def to_file(self, line: str) -> None:
        if self.file is not None:
            self.file.write(line + "\n")
            return
        # After the routed block: something kept this stream (a progress bar that closes at
        # exit, a logging handler). Its lines still belong in the log file.
        with contextlib.suppress(OSError), open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def _route(self, raw: str) -> None:
        line = _last_state(_ANSI.sub("", raw)).rstrip()
        forwarded = _FORWARDED.match(line)
        msg = forwarded.group(1).strip() if forwarded is not None else ""
        if not line.strip() and (forwarded is not None or not self.own_to_console):
            return  # blank noise; our own blank lines (around a table) stay
        line = scrub(line)
        self.to_file(line)
        if self.verbose:
            return
        if forwarded is not None:
            if msg.startswith(PREFIX):
                self.console.write(scrub(msg) + "\n")
                self.console.flush()
            return
        if line.startswith(PREFIX) or self.own_to_console:
            self.console.write(line + "\n")
            self.console.flush()

    def end(self) -> None:
        """Route what is left; later writes are still routed (their noise appended to the
        log file)."""
        with self.lock:
            if self._buf.strip():
                self._route(self._buf)
            self._buf = ""
            self.file = None


_active: _Router | None = None


def _swap_handler_streams(old: object, new: object) -> list[logging.StreamHandler[Any]]:
    """Point every logging handler that writes to `old` at `new` (Ray's logger holds the
    stderr of the moment it was configured)."""
    swapped = []
    loggers: list[Any] = [logging.getLogger()]
    loggers += [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for handler in lg.handlers:
            # (logging's last-resort handler reads sys.stderr each time: it needs nothing.)
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                with contextlib.suppress(AttributeError):
                    handler.setStream(new)
                    swapped.append(handler)
    return swapped


@contextlib.contextmanager
def routed_output(log_path: Path, *, verbose: bool = False) -> Iterator[Path]:
    """Inside the block, sort this process's output into the console and `log_path`."""
    global _active
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    real_out, real_err = sys.stdout, sys.stderr
    with open(log_path, "a", encoding="utf-8", buffering=1) as fh:
        out = _Router(real_out, fh, log_path, lock, own_to_console=True)
        err = _Router(real_err, fh, log_path, lock, own_to_console=False)
        out.verbose = err.verbose = verbose
        command = scrub(str(redact(" ".join(sys.argv[1:]))))
        fh.write(f"--- fusion-etl {command} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        swapped = _swap_handler_streams(real_err, err) + _swap_handler_streams(real_out, out)
        # Library warnings (Python logging) into the log file too.
        library = logging.StreamHandler(err)
        library.setLevel(logging.WARNING)
        library.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(library)
        sys.stdout, sys.stderr = out, err
        previous, _active = _active, err
        try:
            yield log_path
        finally:
            out.flush()
            err.flush()
            sys.stdout, sys.stderr = real_out, real_err
            _active = previous
            logging.getLogger().removeHandler(library)
            for handler in swapped:
                handler.setStream(real_err if handler.stream is err else real_out)
            out.end()
            err.end()


def console_stream() -> TextIO:
    """Where bars go: the terminal behind the routing, if any."""
    return _active.console if _active is not None else sys.stderr


class StageProgress:
    """Progress of one output folder: a bar on a terminal (gone when done), a line every
    PROGRESS_EVERY_S elsewhere, and `finish`'s summary line."""

    def __init__(self, label: str, total: int, done: int, out_url: str) -> None:
        self.label, self.total, self.done, self.out_url = label, total, done, out_url
        self.already = done
        self.rows = 0
        self.tokens = 0
        self.started = time.monotonic()
        self._last_line = self.started
        stream = console_stream()
        self._bar: Any = None
        detail(
            f"{label}: {total} shards, {done} already committed, {total - done} to run -> {out_url}"
        )
        if total > done and _isatty(stream):
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=done,
                desc=label,
                unit="shard",
                file=stream,
                mininterval=1.0,
                leave=False,
                dynamic_ncols=True,
            )

    def _rate(self) -> str:
        secs = max(time.monotonic() - self.started, 1e-9)
        return f", {self.tokens / secs:,.0f} tok/s" if self.tokens else ""

    def update(self, rows: int, tokens: int) -> None:
        self.done += 1
        self.rows += rows
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(1)
            postfix: dict[str, Any] = {"docs": self.rows}
            if self.tokens:
                postfix["tok/s"] = f"{self.tokens / max(time.monotonic() - self.started, 1e-9):.0f}"
            self._bar.set_postfix(postfix)
        elif time.monotonic() - self._last_line >= PROGRESS_EVERY_S:
            self._last_line = time.monotonic()
            log(f"{self.label}: {self.done}/{self.total} shards, {self.rows:,} docs{self._rate()}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def finish(self, total_rows: int, *, complete: bool) -> None:
        self.close()
        ran = self.done - self.already
        secs = time.monotonic() - self.started
        if complete:
            log(
                f"{self.label}: committed {self.total} shards, {total_rows:,} rows -> {self.out_url} "
                f"({self.already} already committed, {ran} ran in {secs:.1f} s{self._rate()})"
            )
        else:
            log(
                f"{self.label}: {self.done} of {self.total} shards committed; "
                "run again without --shards to finish"
            )


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
