"""twistd integration: `twistd pgbalance` options and makeService()."""

from __future__ import annotations

import sys

from twisted.python import usage

from pgtwist import config as configmod


class Options(usage.Options):
    synopsis = "[--config PATH | --demo]"
    longdesc = (
        "pgtwist: a PostgreSQL-protocol-aware connection pooler and load balancer. "
        "--config runs it from a TOML file (every key, with its default: etc/pgbalance.toml in the "
        "source, `pgtwist example-config` once installed); "
        "--demo starts a throwaway local primary + streaming replica, fronts them and prints the DSN."
    )
    optParameters = [
        ["config", "c", None, "Path of the TOML configuration file."],
        ["demo-replicas", None, 1, "Number of streaming replicas the demo starts.", int],
        ["demo-listen", None, "127.0.0.1:6432", "Where the demo's pgtwist listens."],
        ["worker", None, None, "(internal) Run as worker I of N under a supervisor: I/N:FD:DIR (I/Nr: a restart)."],
    ]
    optFlags = [
        ["demo", None, "Start a throwaway local PostgreSQL primary + replica and front them (needs PostgreSQL binaries)."],
        ["check", None, "Validate the configuration, print the result and exit."],
    ]

    def postOptions(self):
        if not self["demo"] and not self["config"]:
            raise usage.UsageError("give --config PATH (or --demo)")
        if self["demo"] and self["config"]:
            raise usage.UsageError("--demo and --config exclude each other")


def makeService(options, reactor=None):
    if reactor is None:  # under twistd: run on pgtwist's reactor unless given --reactor
        from pgtwist.transport.reactor import install_if_free

        install_if_free()
    from pgtwist.service.lifecycle import PgBalanceService

    if options["demo"]:
        from pgtwist.tools.demo import make_demo_service

        return make_demo_service(options, reactor)
    try:
        config = configmod.load(options["config"])
    except configmod.ConfigError as e:
        # twistd shows a traceback for exceptions; a config mistake deserves a plain list.
        sys.stderr.write(str(e) + "\n")
        raise SystemExit(78)  # EX_CONFIG
    if options["check"]:
        for warning in config.warnings:  # (a service that starts logs them instead: lifecycle)
            sys.stderr.write(f"{options['config']}: warning: {warning}\n")
        sys.stdout.write(f"{options['config']}: OK\n")
        raise SystemExit(0)
    from pgtwist.admin import ManholeError
    from pgtwist.service.logs import with_log_format

    worker = None
    if options["worker"]:
        from pgtwist.service import workers

        try:
            worker = workers.WorkerSpec.parse(options["worker"])
        except ValueError as e:
            raise usage.UsageError(str(e))
        workers.die_with_parent()
    try:
        if worker is None and config.workers > 1:
            from pgtwist.service.workers import Supervisor

            # The twistd process supervises; each worker is a `twistd pgbalance --worker` of its own.
            svc = Supervisor(config, reactor, signals=reactor is None)
        else:
            # Under twistd (no reactor given) SIGHUP reloads and SIGTERM drains.
            svc = PgBalanceService(config, reactor, signals=reactor is None, worker=worker)
    except ManholeError as e:
        sys.stderr.write(f"{options['config']}: {e}\n")
        raise SystemExit(78)
    return with_log_format(svc, config.log_format, getattr(options, "parent", None), config.log_level)
