"""Log setup: text or JSON lines on stderr (or a file reopened on SIGUSR1), secrets redacted."""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import datetime, timezone

from kgsupervisor.errors import ConfigError
from kgsupervisor.masking import Mask

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name,
            "pid": record.process, "message": record.getMessage(),
        }
        for field in ("worker_id", "content_id"):
            if getattr(record, field, None) is not None:
                entry[field] = getattr(record, field)
        exception = record.exc_text or (self.formatException(record.exc_info) if record.exc_info else None)
        if exception:
            entry["exception"] = exception
        return json.dumps(entry, ensure_ascii=False)


class SecretFilter(logging.Filter):
    """Masks secrets and credentials in everything a record will print: the message with its
    arguments, the exception with its traceback, the stack.

    A filter, not a wrapper of the formatted line: each part is masked before any formatter
    sees it, so a secret is caught before JSON escapes it (a token holding a line break is
    written `\\n` there), and the raw exception is gone before a host's formatter renders it again.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.mask = Mask(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Mask these too (a reloaded configuration's token), besides those masked already."""
        self.mask = self.mask.with_secrets(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.mask(_message(record)), None
        if record.exc_info:
            # Rendered once, here: the formatters print exc_text and never see the exception.
            record.exc_text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        if record.stack_info:
            record.stack_info = self.mask(record.stack_info)
        return True


def _message(record: logging.LogRecord) -> str:
    """The record's message with its arguments in; what there is when they do not fit."""
    try:
        return record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string is the caller's bug, not a reason to show args raw
        return f"{record.msg!s} (arguments that do not fit: {record.args!r})"


def mask_secrets(secrets: Iterable[str]) -> None:
    """Mask `secrets`, and any credentials, in every line kgsupervisor logs from this process,
    whoever made the handlers: `setup` (the CLI) or the host application of the Python API."""
    secrets = list(secrets)
    for handler in _handlers_reached(logging.getLogger("kgsupervisor")):
        present = [f for f in handler.filters if isinstance(f, SecretFilter)]
        if present:
            present[0].add(secrets)
        else:
            handler.addFilter(SecretFilter(secrets))


def _handlers_reached(top: logging.Logger) -> list[logging.Handler]:
    """Every handler a record of `top` or of its children can reach: their own, their
    ancestors' while they propagate, and Python's last resort (used when there is none)."""
    children = [logger for name, logger in logging.Logger.manager.loggerDict.items()
                if name.startswith(top.name + ".") and isinstance(logger, logging.Logger)]
    handlers: list[logging.Handler] = []
    for logger in [top, *children]:
        current: logging.Logger | None = logger
        while current is not None:
            handlers += [h for h in current.handlers if h not in handlers]
            current = current.parent if current.propagate else None
    if logging.lastResort is not None and logging.lastResort not in handlers:
        handlers.append(logging.lastResort)
    return handlers


def setup(fmt: str = "text", level: int = logging.INFO, secrets: Iterable[str] = (),
          path: str | None = None) -> None:
    """Send kgsupervisor's logs to stderr (or the file `path`) in `fmt` ('text' or 'json'),
    `secrets` and any credentials masked (masking.secrets_of gives a configuration's)."""
    try:
        handler: logging.Handler = logging.FileHandler(path, encoding="utf-8") if path else logging.StreamHandler(sys.stderr)
    except OSError as exc:
        raise ConfigError("KG_LOG_FILE", path, f"a writable file ({exc.strerror})") from None
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(SecretFilter(secrets))
    root = logging.getLogger("kgsupervisor")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def host_port(host: str, port: int) -> str:
    """`127.0.0.1:9188` or `[::1]:9188`: an IPv6 address in brackets, as a URL writes it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reopen() -> None:
    """Reopen every file handler of kgsupervisor's loggers (SIGUSR1, after logrotate moved them)."""
    for handler in logging.getLogger("kgsupervisor").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.close()
                handler.stream = handler._open()
            finally:
                handler.release()


class ProgressLineHandler(logging.StreamHandler):
    """On a terminal: log lines scroll above one progress line that stays at the bottom."""

    CLEAR = "\r\033[K"

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self.line = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.acquire()
        try:
            self.stream.write(self.CLEAR)
            super().emit(record)
            self.stream.write(self.line)
            self.flush()
        finally:
            self.release()

    def show(self, line: str) -> None:
        self.acquire()
        try:
            self.line = line
            self.stream.write(self.CLEAR + line)
            self.flush()
        finally:
            self.release()

    def finish(self) -> None:
        if self.line:
            self.stream.write("\n")
            self.flush()
            self.line = ""


def attach_progress_line() -> ProgressLineHandler | None:
    """If kgsupervisor logs to a terminal, swap its handler for one that keeps a progress line.

    Workers then log only warnings and errors there: they write to the same terminal without
    knowing about the line, and the progress line says what their INFO lines would.
    """
    root = logging.getLogger("kgsupervisor")
    plain = [h for h in root.handlers if type(h) is logging.StreamHandler]
    if len(plain) != 1 or not getattr(plain[0].stream, "isatty", lambda: False)():
        return None
    handler = ProgressLineHandler(plain[0].stream)
    handler.setFormatter(plain[0].formatter)
    for f in plain[0].filters:
        handler.addFilter(f)
    root.handlers[:] = [handler]
    logging.getLogger("kgsupervisor.worker").setLevel(logging.WARNING)
    return handler
