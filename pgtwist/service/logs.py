"""Log output under twistd: human-readable text (twistd's own observer) or JSON lines (log_format = "json")."""

from __future__ import annotations

import sys

from twisted.application import service
from twisted.logger import FileLogObserver, ILogObserver, eventAsJSON, formatEvent
from twisted.python import logfile
from twisted.python.components import Componentized


def _json_line(event) -> str:
    # twisted.logger's JSON form (loadable with eventsFromJSONLogFile), plus the rendered message.
    return eventAsJSON(dict(event, text=formatEvent(event))) + "\n"


def json_observer(logfile_name: str | None):
    """JSON lines (one event per line, every field kept: client and server ids included) to twistd's --logfile."""
    if not logfile_name or logfile_name == "-":
        out = sys.stdout
    else:
        out = logfile.LogFile.fromFullPath(logfile_name)
    return FileLogObserver(out, _json_line)


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


def with_log_format(svc, log_format: str, twistd_options) -> service.IService:
    if log_format != "json":
        return svc
    name = twistd_options.get("logfile") if twistd_options is not None else None
    return WithLogObserver(svc, json_observer(name))
