"""Log setup: text or JSON lines on stderr (or a file reopened on SIGUSR1), secrets redacted."""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from .errors import ConfigError

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
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class SecretFilter(logging.Filter):
    """Replaces any occurrence of the given secrets in a record with ********."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            if any(s in message for s in self.secrets):
                for s in self.secrets:
                    message = message.replace(s, "********")
                record.msg, record.args = message, None
        return True


def setup(fmt: str = "text", level: int = logging.INFO, secrets: list[str] | None = None,
          path: str | None = None) -> None:
    """Send kgsupervisor's logs to stderr (or the file `path`) in `fmt` ('text' or 'json')."""
    try:
        handler: logging.Handler = logging.FileHandler(path, encoding="utf-8") if path else logging.StreamHandler(sys.stderr)
    except OSError as exc:
        raise ConfigError("KG_LOG_FILE", path, f"a writable file ({exc.strerror})") from None
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(SecretFilter(secrets or []))
    root = logging.getLogger("kgsupervisor")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


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
