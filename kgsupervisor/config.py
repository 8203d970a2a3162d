"""Settings: one frozen value built from flags > environment > TOML file > defaults, validated."""
from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .pgdb import redact


def _positive(v: float) -> str | None:
    return None if v > 0 else "a number > 0"


def _at_least(n: int) -> Callable[[Any], str | None]:
    return lambda v: None if v >= n else f"a whole number >= {n}"


def _between(lo: int, hi: int) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"a whole number from {lo} to {hi}"


def _http_url(v: str) -> str | None:
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return "an http:// or https:// URL with a host, e.g. http://localhost:8088"
    return None


def split_urls(value: str) -> list[str]:
    """KG_SERVICE_URL as a list: one URL, or several separated by commas."""
    return [u.strip().rstrip("/") for u in value.split(",") if u.strip()]


def _http_urls(v: str) -> str | None:
    urls = split_urls(v)
    if not urls:
        return "an http:// or https:// URL with a host, e.g. http://localhost:8088 (or several, comma-separated)"
    for url in urls:
        problem = _http_url(url)
        if problem:
            return f"{problem} (or several, comma-separated; {url!r} is not one)" if len(urls) > 1 else problem
    if len(set(urls)) != len(urls):
        return "each KG service URL once"
    return None


def parse_addr(value: str) -> tuple[str, int] | None:
    """'127.0.0.1:9188', '[::1]:9188' or 'off' (None); a ConfigError names what is wrong."""
    if value.strip().lower() == "off":
        return None
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("KG_STATUS_ADDR", value, "HOST:PORT (e.g. 127.0.0.1:9188) or off")
    return host, int(port)


def _addr(v: str) -> str | None:
    try:
        parse_addr(v)
    except ConfigError as exc:
        return exc.expected
    return None


def _setting(default: Any, env: str | None, help: str, check: Callable[[Any], str | None] | None = None,
             *, listable: bool = False) -> Any:
    """A field of Settings; `listable`: the config file may give a list, joined with commas."""
    return dataclasses.field(default=default, metadata={"env": env, "help": help, "check": check, "listable": listable})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of kgsupervisor; the field metadata names its variable and says what it means."""

    db_path: str | None = _setting(None, "KG_DB_PATH", "the SQLite database, or a postgresql:// URL (required)")
    num_workers: int = _setting(2, "KG_NUM_WORKERS", "worker processes", _between(1, 256))
    poll_interval: float = _setting(5.0, "KG_POLL_INTERVAL", "seconds an idle worker waits before polling again", _positive)
    service_enabled: bool = _setting(True, "KG_SERVICE_ENABLED", "false: workers claim nothing")
    service_url: str = _setting("http://localhost:8088", "KG_SERVICE_URL",
                                "KG service base URL, or several comma-separated (a list in the file)", _http_urls,
                                listable=True)
    service_timeout: float = _setting(1800.0, "KG_SERVICE_TIMEOUT", "read timeout of one ingest request, seconds", _positive)
    service_token: str | None = _setting(None, "KG_SERVICE_TOKEN", "bearer token sent to the KG service (never logged)")
    service_token_file: str | None = _setting(None, "KG_SERVICE_TOKEN_FILE", "file holding the bearer token")
    batch_size: int = _setting(5, "KG_BATCH_SIZE", "rows one claim takes at most", _between(1, 1000))
    max_attempts: int = _setting(5, "KG_MAX_ATTEMPTS", "attempts before a document is marked failed", _between(1, 1000))
    lease_seconds: float = _setting(60.0, "KG_LEASE_SECONDS", "lease of a claim, renewed while in flight", _positive)
    retry_backoff: float = _setting(5.0, "KG_RETRY_BACKOFF", "base of the exponential backoff between attempts, seconds", _positive)
    retry_backoff_max: float = _setting(600.0, "KG_RETRY_BACKOFF_MAX", "longest backoff between attempts, seconds", _positive)
    breaker_threshold: int = _setting(3, "KG_BREAKER_THRESHOLD", "consecutive service failures that pause claiming", _between(1, 1000))
    max_answer_mb: float = _setting(64.0, "KG_MAX_ANSWER_MB", "largest KG answer accepted, MiB", _positive)
    drain_timeout: float = _setting(60.0, "KG_DRAIN_TIMEOUT", "seconds in-flight documents get to finish on SIGTERM", _positive)
    hang_timeout: float = _setting(60.0, "KG_HANG_TIMEOUT", "a worker silent this long is killed and replaced", _positive)
    poison_after: int = _setting(3, "KG_POISON_AFTER", "worker crashes on one document before it is failed as a poison pill", _between(1, 1000))
    max_documents_per_worker: int = _setting(0, "KG_MAX_DOCUMENTS_PER_WORKER", "recycle a worker after this many documents (0: never)", _at_least(0))
    max_worker_rss_mb: float = _setting(0.0, "KG_MAX_WORKER_RSS_MB", "recycle a worker above this resident memory, MiB (0: never)", lambda v: None if v >= 0 else "a number >= 0")
    pidfile: str | None = _setting(None, "KG_PIDFILE", "pidfile of `run`, used by `reload` and `stop`")
    status_addr: str = _setting("127.0.0.1:9188", "KG_STATUS_ADDR", "status endpoint HOST:PORT, or off", _addr)
    log_format: str = _setting("text", "KG_LOG_FORMAT", "text or json", lambda v: None if v in ("text", "json") else "text or json")
    log_file: str | None = _setting(None, "KG_LOG_FILE", "log to this file (reopened on SIGUSR1) instead of stderr")

    def token(self) -> str | None:
        """The bearer token, from the setting or the file it names."""
        if self.service_token:
            return self.service_token
        if not self.service_token_file:
            return None
        try:
            with open(self.service_token_file, encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError as exc:
            raise ConfigError("service_token_file", self.service_token_file,
                              f"a readable file ({exc.strerror})") from None

    def service_urls(self) -> list[str]:
        """Every KG service endpoint, in the order given."""
        return split_urls(self.service_url)

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with the token and a database password hidden, for display."""
        values = dataclasses.asdict(self)
        if values["service_token"]:
            values["service_token"] = "********"
        if values["db_path"]:
            values["db_path"] = redact(values["db_path"])
        return values


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
ENV_NAMES = {f.metadata["env"]: f.name for f in FIELDS.values() if f.metadata["env"]}
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


def _label(name: str, source: str) -> str:
    """How the user spelled a setting, so an error names what they typed."""
    if source in ("env", "default"):
        return FIELDS[name].metadata["env"] or name
    if source == "flag":
        return "--" + name.replace("_", "-")
    return name


def _coerce(name: str, raw: Any, label: str | None = None) -> Any:
    """Turn a flag, environment or file value into the field's type, or say what was expected."""
    field = FIELDS[name]
    kind = field.type
    name = label or name
    if raw is None:
        return None
    if "bool" in kind:
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower()
        if word in TRUE_WORDS | FALSE_WORDS:
            return word in TRUE_WORDS
        raise ConfigError(name, raw, "true or false")
    if kind == "int":
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ConfigError(name, raw, "a whole number")
        try:
            return int(str(raw).strip()) if not isinstance(raw, (int, float)) else int(raw)
        except ValueError:
            raise ConfigError(name, raw, "a whole number") from None
    if kind == "float":
        try:
            value = float(raw) if not isinstance(raw, bool) else None
        except (TypeError, ValueError):
            value = None
        if value is None or value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(name, raw, "a number")
        return value
    if isinstance(raw, list) and field.metadata["listable"]:
        if not all(isinstance(item, str) for item in raw):
            raise ConfigError(name, raw, "a list of strings")
        return ",".join(raw)
    return str(raw)


def read_file(path: str) -> dict[str, Any]:
    """The TOML config file as {setting: value}; unknown keys are an error, not a silent no-op."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("--config", path, "an existing TOML file") from None
    except OSError as exc:
        raise ConfigError("--config", path, f"a readable TOML file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", path, f"valid TOML ({exc})") from None
    section = data.get("kgsupervisor", data)
    unknown = sorted(set(section) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}", section[unknown[0]],
                          f"a known setting ({', '.join(FIELDS)})")
    return section


def load(cli: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
         config_file: str | None = None) -> tuple[Settings, dict[str, str]]:
    """Build validated Settings and where each value came from (flag, env, file or default)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources = {name: "default" for name in FIELDS}
    layers = [
        (f"file {config_file}", read_file(config_file) if config_file else {}),
        ("env", {ENV_NAMES[k]: v for k, v in environ.items() if k in ENV_NAMES and v != ""}),
        ("flag", {k: v for k, v in (cli or {}).items() if v is not None}),
    ]
    for source, layer in layers:
        for name, raw in layer.items():
            values[name] = _coerce(name, raw, _label(name, source))
            sources[name] = source
    settings = Settings(**values)
    validate(settings, sources)
    return settings, sources


def validate(settings: Settings, sources: Mapping[str, str] | None = None) -> None:
    """Check every value against its field's rule; raise ConfigError naming the first bad one
    the way the user spelled it (flag, variable or file key)."""
    sources = sources or {}
    for name, f in FIELDS.items():
        value = getattr(settings, name)
        check = f.metadata["check"]
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                source = sources.get(name, "env")
                label = _label(name, source) if source in ("env", "flag") else f"{name} (from {source})"
                raise ConfigError(label, value, problem)
    if settings.retry_backoff_max < settings.retry_backoff:
        raise ConfigError("KG_RETRY_BACKOFF_MAX", settings.retry_backoff_max,
                          f"a number >= KG_RETRY_BACKOFF ({settings.retry_backoff:g})")


def require_db(settings: Settings) -> str:
    """The database path, or a ConfigError saying how to give one."""
    if not settings.db_path:
        raise ConfigError("KG_DB_PATH", None, "a database path (--db PATH or KG_DB_PATH)")
    return settings.db_path
