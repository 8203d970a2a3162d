"""Settings: one frozen value built from flags > environment > TOML file > defaults, validated."""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

from kgsupervisor.addresses import addr_problem, control_at, mask_urls, service_urls_problem, split_urls
from kgsupervisor.addresses import parse_addr  # noqa: F401  (re-exported: callers and tests use config.parse_addr)
from kgsupervisor.bearer import TOKEN_FILE_LIMIT, checked_token, read_token_file  # noqa: F401  (the limit: for tests)
from kgsupervisor.errors import ConfigError
from kgsupervisor.masking import redact

MASK = "********"
HOUR, DAY, WEEK = 3600.0, 86400.0, 604800.0
SECRET_KEY = re.compile(r"token|passw|secret|credential", re.I)
SECRET_SETTINGS = ("service_token", "console_token")  # shown as MASK wherever a value is shown


def _positive_up_to(hi: float, note: str) -> Callable[[float], str | None]:
    """A number > 0 and <= hi: past a sane bound a timeout overflows the clock and every request dies."""
    return lambda v: None if 0 < v <= hi else f"a number > 0 and <= {hi:.0f} ({note})"


def _at_least(n: int) -> Callable[[Any], str | None]:
    return lambda v: None if v >= n else f"a whole number >= {n}"


def _between(lo: int, hi: int) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"a whole number from {lo} to {hi}"


def _path(v: str) -> str | None:
    return None if control_at(v) is None else "a path without control characters"


def _setting(default: Any, env: str | None, help: str, check: Callable[[Any], str | None] | None = None,
             *, listable: bool = False, flag: str | None = None) -> Any:
    """A field of Settings; `listable`: the config file may give a list, joined with commas;
    `flag`: the command-line flag when it is not --<name-with-dashes>."""
    return dataclasses.field(default=default, metadata={"env": env, "help": help, "check": check,
                                                        "listable": listable, "flag": flag})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of kgsupervisor; the field metadata names its variable and says what it means."""

    db_path: str | None = _setting(None, "KG_DB_PATH", "the SQLite database, or a postgresql:// URL (required)",
                                   _path, flag="--db")
    num_workers: int = _setting(2, "KG_NUM_WORKERS", "worker processes", _between(1, 256), flag="--workers")
    poll_interval: float = _setting(5.0, "KG_POLL_INTERVAL", "seconds an idle worker waits before polling again "
                                    "(at most 3600)", _positive_up_to(HOUR, "1 hour"))
    commit_watch: str = _setting("auto", "KG_COMMIT_WATCH", "auto: an idle worker waits for a commit (inotify on "
                                 "SQLite's -wal file, PostgreSQL's LISTEN socket), polling where it cannot; "
                                 "poll: it always polls", lambda v: None if v in ("auto", "poll") else "auto or poll")
    service_enabled: bool = _setting(True, "KG_SERVICE_ENABLED", "false: workers claim nothing")
    service_url: str = _setting("http://localhost:8088", "KG_SERVICE_URL",
                                "KG service base URL, or several comma-separated (a list in the file)",
                                service_urls_problem, listable=True)
    service_timeout: float = _setting(1800.0, "KG_SERVICE_TIMEOUT", "the longest one ingest request may take, "
                                      "seconds: per read and in all (at most 86400)", _positive_up_to(DAY, "1 day"))
    service_token: str | None = _setting(None, "KG_SERVICE_TOKEN", "bearer token sent to the KG service (never logged)")
    service_token_file: str | None = _setting(None, "KG_SERVICE_TOKEN_FILE", "file holding the bearer token", _path)
    batch_size: int = _setting(5, "KG_BATCH_SIZE", "rows one claim takes at most", _between(1, 1000))
    adaptive: bool = _setting(True, "KG_ADAPTIVE", "on: each KG endpoint gets an in-flight limit that follows "
                              "its capacity (between KG_MIN_INFLIGHT and the worker count); off: every worker sends")
    min_inflight: int = _setting(1, "KG_MIN_INFLIGHT", "the lowest in-flight limit of an endpoint (at most 256)",
                                 _between(1, 256))
    rate_limit_rpm: int = _setting(0, "KG_RATE_LIMIT_RPM", "requests per minute to each KG endpoint, all "
                                   "workers together (on PostgreSQL all hosts); 0: no limit", _between(0, 10**9))
    token_budget_tpm: int = _setting(0, "KG_TOKEN_BUDGET_TPM", "estimated tokens per minute to each KG endpoint, "
                                     "shared as KG_RATE_LIMIT_RPM is; 0: no budget", _between(0, 10**12))
    chars_per_token: float = _setting(4.0, "KG_CHARS_PER_TOKEN", "characters of text counted as one token "
                                      "(at most 1000)", _positive_up_to(1000, "characters"))
    max_attempts: int = _setting(5, "KG_MAX_ATTEMPTS", "attempts before a document is marked failed", _between(1, 1000))
    lease_seconds: float = _setting(60.0, "KG_LEASE_SECONDS", "lease of a claim, renewed while in flight "
                                    "(at most 86400)", _positive_up_to(DAY, "1 day"))
    retry_backoff: float = _setting(5.0, "KG_RETRY_BACKOFF", "base of the exponential backoff between attempts, "
                                    "seconds (at most KG_RETRY_BACKOFF_MAX)", _positive_up_to(WEEK, "1 week"))
    retry_backoff_max: float = _setting(600.0, "KG_RETRY_BACKOFF_MAX", "longest backoff between attempts, seconds "
                                        "(at most 604800)", _positive_up_to(WEEK, "1 week"))
    breaker_threshold: int = _setting(3, "KG_BREAKER_THRESHOLD", "consecutive service failures that pause claiming", _between(1, 1000))
    max_answer_mb: float = _setting(64.0, "KG_MAX_ANSWER_MB", "largest KG answer accepted, MiB (at most 4096)",
                                    _positive_up_to(4096, "4 GiB"))
    drain_timeout: float = _setting(60.0, "KG_DRAIN_TIMEOUT", "seconds in-flight documents get to finish on SIGTERM "
                                    "(at most 86400)", _positive_up_to(DAY, "1 day"))
    hang_timeout: float = _setting(60.0, "KG_HANG_TIMEOUT", "a worker silent this long is killed and replaced, "
                                   "seconds (at most 86400)", _positive_up_to(DAY, "1 day"))
    poison_after: int = _setting(3, "KG_POISON_AFTER", "worker crashes on one document before it is failed as a poison pill", _between(1, 1000))
    history_days: int = _setting(30, "KG_HISTORY_DAYS", "days the attempt history keeps (0: all; at most 36500)",
                                 _between(0, 36500))
    max_documents_per_worker: int = _setting(0, "KG_MAX_DOCUMENTS_PER_WORKER", "recycle a worker after this many documents (0: never)", _at_least(0))
    max_worker_rss_mb: float = _setting(0.0, "KG_MAX_WORKER_RSS_MB", "recycle a worker above this resident memory, "
                                        "MiB (0: never; at most 1048576)",
                                        lambda v: None if 0 <= v <= 1048576 else "a number >= 0 and <= 1048576 (1 TiB)")
    pidfile: str | None = _setting(None, "KG_PIDFILE", "pidfile of `run`, used by `reload` and `stop`", _path)
    status_addr: str = _setting("127.0.0.1:9188", "KG_STATUS_ADDR", "status endpoint HOST:PORT, or off", addr_problem)
    console_token: str | None = _setting(None, "KG_CONSOLE_TOKEN", "operator token of the web console: its "
                                         "login, and so every action (never logged)")
    console_token_file: str | None = _setting(None, "KG_CONSOLE_TOKEN_FILE", "file holding the console's "
                                              "operator token", _path)
    log_format: str = _setting("text", "KG_LOG_FORMAT", "text or json", lambda v: None if v in ("text", "json") else "text or json")
    log_file: str | None = _setting(None, "KG_LOG_FILE", "log to this file (reopened on SIGUSR1) instead of stderr", _path)

    def token(self) -> str | None:
        """The bearer token, from the setting or the file it names, without a BOM or surrounding
        whitespace; a ConfigError that never shows it if it is empty or not printable ASCII."""
        if self.service_token:
            return checked_token(self.service_token, "service_token", MASK)
        if self.service_token_file:
            path = self.service_token_file
            return checked_token(read_token_file(path), "service_token_file", path)
        return None

    def console_key(self) -> str | None:
        """The console's operator token, from the setting or the file it names, cleaned and
        checked as the bearer token is; None when neither is set (the console then acts on nothing)."""
        if self.console_token:
            return checked_token(self.console_token, "console_token", MASK)
        if self.console_token_file:
            path = self.console_token_file
            text = read_token_file(path, "console_token_file", "the operator token")
            return checked_token(text, "console_token_file", path)
        return None

    def service_urls(self) -> list[str]:
        """Every KG service endpoint, in the order given."""
        return split_urls(self.service_url)

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with the token, URL credentials and a database password hidden, for display."""
        values = dataclasses.asdict(self)
        for name in ("service_token", "console_token", "service_url", "db_path"):
            values[name] = _shown(name, values[name])
        return values


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
ENV_NAMES = {f.metadata["env"]: f.name for f in FIELDS.values() if f.metadata["env"]}
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


def _shown(name: str, value: Any) -> Any:
    """`value` of setting `name` as a message or display may show it: secrets hidden."""
    if isinstance(value, list):
        return [_shown(name, item) for item in value]
    if name in SECRET_SETTINGS and value:
        return MASK
    if not isinstance(value, str):
        return value
    if name == "service_url":
        return mask_urls(value)
    return redact(value) if name == "db_path" else value


def flag_name(name: str) -> str:
    """The command-line flag of a setting, as `run` and `worker` spell it."""
    return FIELDS[name].metadata["flag"] or "--" + name.replace("_", "-")


def _label(name: str, source: str) -> str:
    """How the user spelled a setting, so an error names what they typed."""
    if source in ("env", "default"):
        return FIELDS[name].metadata["env"] or name
    if source == "flag":
        return flag_name(name)
    return name


def _spelled(name: str, sources: Mapping[str, str]) -> str:
    """The label of a setting in a validation error: flag or variable, or file key and file."""
    source = sources.get(name, "env")
    return _label(name, source) if source in ("env", "flag", "default") else f"{name} (from {source})"


def _coerce(name: str, raw: Any, label: str | None = None) -> Any:
    """Turn a flag, environment or file value into the field's type, or say what was expected."""
    field = FIELDS[name]
    kind = field.type

    def refused(expected: str) -> ConfigError:
        return ConfigError(label or name, _shown(name, raw), expected)
    if raw is None:
        return None
    if "bool" in kind:
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower()
        if word in TRUE_WORDS | FALSE_WORDS:
            return word in TRUE_WORDS
        raise refused("true or false")
    if kind == "int":
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise refused("a whole number")
        try:
            return int(str(raw).strip()) if not isinstance(raw, (int, float)) else int(raw)
        except ValueError:
            raise refused("a whole number") from None
    if kind == "float":
        return _coerce_float(raw, refused)
    if isinstance(raw, list) and field.metadata["listable"]:
        if not all(isinstance(item, str) for item in raw):
            raise refused("a list of strings")
        return ",".join(raw)
    if isinstance(raw, os.PathLike):
        raw = os.fspath(raw)
    if not isinstance(raw, str):  # a number or a table from the file: a typo, not a name to use
        raise refused("a string")
    return raw


def _coerce_float(raw: Any, refused: Callable[[str], ConfigError]) -> float:
    """A finite float; nan and inf pass every comparison a bound check makes, so they are refused here."""
    try:
        value = float(raw) if not isinstance(raw, bool) else None
    except (TypeError, ValueError, OverflowError):  # OverflowError: a TOML integer of 400 digits
        value = None
    if value is None or value != value or value in (float("inf"), float("-inf")):
        raise refused("a number")
    return value


def read_file(path: str) -> dict[str, Any]:
    """The TOML config file as {setting: value}; unknown keys are an error, not a silent no-op."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("--config", path, "an existing TOML file") from None
    except OSError as exc:
        raise ConfigError("--config", path, f"a readable TOML file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("--config", path, f"a UTF-8 TOML file (byte {exc.start + 1} is not UTF-8)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", path, f"valid TOML ({exc})") from None
    section = _settings_table(data, path)
    unknown = sorted(set(section) - set(FIELDS))
    if unknown:
        raise _unknown_key(path, unknown[0], section[unknown[0]])
    return section


def _unknown_key(path: str, key: str, value: Any) -> ConfigError:
    """The error for a key that is no setting: the likely one named, a mistyped token's value hidden."""
    close = difflib.get_close_matches(key, FIELDS, n=1)
    secret = SECRET_KEY.search(key) or any(name in SECRET_SETTINGS for name in close)
    known = f"did you mean {close[0]}?" if close else ", ".join(FIELDS)
    return ConfigError(f"{path}: {key}", MASK if secret else value, f"a known setting ({known})")


def _settings_table(data: dict[str, Any], path: str) -> dict[str, Any]:
    """The [kgsupervisor] table if the file has one, else its top level."""
    if "kgsupervisor" not in data:
        return data
    section = data["kgsupervisor"]
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: kgsupervisor", section, "a [kgsupervisor] table of settings")
    # A setting above the table would be silently ignored; other tools' keys are left alone.
    stray = sorted(set(data) & set(FIELDS))
    if stray:
        raise ConfigError(f"{path}: {stray[0]}", _shown(stray[0], data[stray[0]]),
                          "to be inside the [kgsupervisor] table (settings above it are not read)")
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
                raise ConfigError(_spelled(name, sources), _shown(name, value), problem)
    _check_backoff_order(settings, sources)


def _check_backoff_order(settings: Settings, sources: Mapping[str, str]) -> None:
    """The backoff base may not exceed its cap; the error names the one the user set."""
    base, cap = settings.retry_backoff, settings.retry_backoff_max
    if base <= cap:
        return
    if sources.get("retry_backoff_max", "env") == "default":
        raise ConfigError(_spelled("retry_backoff", sources), base,
                          f"a number <= {_spelled('retry_backoff_max', sources)} ({cap:g})")
    raise ConfigError(_spelled("retry_backoff_max", sources), cap,
                      f"a number >= {_spelled('retry_backoff', sources)} ({base:g})")


def require_db(settings: Settings) -> str:
    """The database path, or a ConfigError saying how to give one."""
    if not settings.db_path:
        raise ConfigError("KG_DB_PATH", None, "a database path (--db PATH or KG_DB_PATH)")
    return settings.db_path
