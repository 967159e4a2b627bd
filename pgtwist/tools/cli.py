"""`pgtwist`: one command beside `twistd pgbalance` -- run, check, passwd, example-config, --version."""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import resources
from pathlib import Path

from pgtwist import __version__

EX_CONFIG = 78  # sysexits.h: the config is wrong (systemd: RestartPreventExitStatus=78)


def example_config_text() -> str:
    """etc/pgbalance.toml as installed with the package: every key, with its default."""
    return resources.files("pgtwist.examples").joinpath("pgbalance.toml").read_text(encoding="utf-8")


def _example_config_path() -> str:
    return str(resources.files("pgtwist.examples").joinpath("pgbalance.toml"))


def version_text() -> str:
    import twisted

    return f"pgtwist {__version__} (Twisted {twisted.__version__}, Python {platform.python_version()})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgtwist",
        description="pgtwist: a PostgreSQL-protocol-aware connection pooler and load balancer.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the path below on one line, unbroken
        epilog=(
            "Every configuration key is documented, with its default, in\n"
            f"  {_example_config_path()}\n"
            "(`pgtwist example-config > pgbalance.toml` writes a copy to start from).\n"
            "`pgtwist run` is `twistd --nodaemon pgbalance`: `twistd pgbalance --help` lists its options."
        ),
    )
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser("run", help="run in the foreground (SIGHUP reloads, SIGTERM drains)")
    run.add_argument("--config", "-c", required=True, help="the TOML configuration file")
    run.add_argument("twistd_args", nargs=argparse.REMAINDER, help="more `twistd pgbalance` options (after --)")
    check = commands.add_parser("check", help=f"validate a configuration; exit 0 if good, {EX_CONFIG} if not")
    check.add_argument("--config", "-c", required=True, help="the TOML configuration file")
    commands.add_parser("passwd", help="print a password's SCRAM-SHA-256 verifier (pgtwist passwd --help)", add_help=False)
    commands.add_parser("example-config", help="print the example configuration (every key, with its default)")
    return parser


def plugin_reachable() -> None:
    """Let twistd find the `pgbalance` plugin wherever pgtwist was installed from.

    `pip install .` copies twisted/plugins/pgbalance.py into site-packages' twisted/plugins,
    where twistd looks. An editable install (`pip install -e .`) does not: its import hook
    serves the pgtwist package only, so outside the source tree twistd said "Unknown command:
    pgbalance". The source tree's plugin directory then joins twisted.plugins' search path.
    """
    import twisted.plugins

    here = Path(__file__).resolve().parents[2] / "twisted" / "plugins"
    if (here / "pgbalance.py").is_file() and str(here) not in twisted.plugins.__path__:
        twisted.plugins.__path__.append(str(here))


def twistd() -> None:
    """twistd with sys.argv, the pgbalance plugin reachable (`pgtwist run`, and each worker of `workers = N`)."""
    from twisted.scripts.twistd import run as twistd_run

    plugin_reachable()
    twistd_run()


def run(config: str, extra: list[str]) -> int:
    """In this process (so a service manager's signals and $NOTIFY_SOCKET reach pgtwist itself)."""
    extra = extra[1:] if extra[:1] == ["--"] else extra
    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "pgbalance", "--config", config, *extra]
    twistd()  # exits through SystemExit (78 for a config mistake)
    return 0


def check(config: str, stdout=None, stderr=None) -> int:
    from pgtwist import config as configmod

    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        loaded = configmod.load(config)
    except configmod.ConfigError as e:
        stderr.write(str(e) + "\n")
        return EX_CONFIG
    for warning in loaded.warnings:
        stderr.write(f"{config}: warning: {warning}\n")
    stdout.write(f"{config}: OK\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["passwd"]:  # its own parser, its own --help
        from pgtwist.tools import passwd

        return passwd.main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.config, args.twistd_args)
    if args.command == "check":
        return check(args.config)
    if args.command == "example-config":
        sys.stdout.write(example_config_text())
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
