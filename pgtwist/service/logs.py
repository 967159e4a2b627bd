"""Log output under twistd: human-readable text or JSON lines (log_format), filtered at log_level.

A JSON line carries `ts` (UTC, ISO 8601), `level`, `msg` (the rendered message), `logger` (the
namespace) and the event's own fields (client, server, user, database, node, sqlstate...), not
Twisted's internal keys (log_format, log_source, log_logger...), which say nothing to a log
pipeline and could carry object reprs. Only plain values are kept: a field holding some other
object is written as its str() only for the few known to be addresses (node, addr); the rest
is dropped, so that no object's repr (a config, a credential) ever reaches a log line.
"""

from __future__ import annotations

import json
import sys
import time

from twisted.application import service
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.python import logfile
from twisted.python.components import Componentized

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}
_SCALARS = (str, int, float, bool, type(None))
_AS_TEXT = frozenset(("node", "addr", "peer", "listen", "why", "reason"))
# Keys of Twisted's legacy (twisted.python.log) events, which the JSON line says otherwise or not at all.
_LEGACY = frozenset(("message", "isError", "system", "format", "time", "printed", "failure", "log_legacy"))


def _level_name(event) -> str:
    level = event.get("log_level")
    if level is None:
        return "error" if event.get("isError") else "info"
    return level.name


def json_fields(event) -> dict:
    """The JSON object for one event (see the module docstring)."""
    when = event.get("log_time") or event.get("time") or time.time()
    out = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int((when % 1) * 1000):03d}Z",
        "level": _level_name(event),
        "msg": formatEvent(event) if "log_format" in event else " ".join(map(str, event.get("message", ()))),
        "logger": event.get("log_namespace") or event.get("system") or "-",
    }
    failure = event.get("log_failure") or event.get("failure")
    if failure is not None:
        out["error"] = failure.getErrorMessage()
        out["error_type"] = getattr(failure.type, "__name__", str(failure.type))
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY or key in out:
            continue
        if isinstance(value, _SCALARS):
            out[key] = value
        elif key in _AS_TEXT:
            out[key] = str(value)
    return out


def _json_line(event) -> str:
    return json.dumps(json_fields(event), default=str, ensure_ascii=False) + "\n"


def _output(logfile_name: str | None):
    # (twistd's own rotation: LogFile rotates at 1 MB; under systemd/Kubernetes log to stdout ("-") instead.)
    if not logfile_name or logfile_name == "-":
        return sys.stdout
    return logfile.LogFile.fromFullPath(logfile_name)


def json_observer(logfile_name: str | None):
    """JSON lines (one event per line) to twistd's --logfile or stdout."""
    return FileLogObserver(_output(logfile_name), _json_line)


def text_observer(logfile_name: str | None):
    return FileLogObserver(_output(logfile_name), lambda event: (formatEventAsClassicLogText(event) or ""))


def filtered(observer, log_level: str):
    """*observer*, seeing only events at *log_level* or above."""
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=LEVELS.get(log_level, LogLevel.info))])


class WithLogObserver(service.MultiService):
    """Wraps the real service so that twistd logs through *observer*.

    twistd creates the Application, adds the service to it, and only then starts logging,
    with the Application's ILogObserver component when it has one: this sets it.
    """

    def __init__(self, child: service.IService, observer):
        super().__init__()
        self.observer = observer
        child.setServiceParent(self)

    def setServiceParent(self, parent):
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def with_log_format(svc, log_format: str, twistd_options, log_level: str = "info") -> service.IService:
    """Our observer (JSON lines or twistd's classic text), filtered at *log_level*, where twistd logs.

    (twistd's default observer would print debug events too: log_level needs ours even for text.)
    """
    if twistd_options is None and log_format != "json":
        return svc  # not under twistd: whoever runs the service observes its log
    options = twistd_options if twistd_options is not None else {}
    name = options.get("logfile")
    if not name and not options.get("nodaemon", True):
        name = "twistd.log"  # where twistd itself writes when it daemonizes
    observer = json_observer(name) if log_format == "json" else text_observer(name)
    return WithLogObserver(svc, filtered(observer, log_level))
