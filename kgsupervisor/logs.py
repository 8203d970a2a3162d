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
