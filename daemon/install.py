"""``imageqc service ...``: install imageqc as a systemd unit or a Windows service.

On Linux the unit is generated from the real configuration (its paths decide
the unit's write access, read-only paths and mount dependencies) and written
to ``/etc/systemd/system`` (or printed with ``--dry-run``). The privileged
follow-up (creating the account and folders, ``systemctl``) is printed, never
run: an admin sees exactly what will happen and runs it. See
``systemd/README.md``.

On Windows the same command registers the pywin32 service
(:mod:`windows_service.manage`), with restart-on-failure recovery actions.
See ``windows_service/README.md``.

Decisions, documented in the guides:

- State under ``/var/lib/imageqc`` -> ``StateDirectory=imageqc`` (systemd
  creates and owns it); a log under ``/var/log/imageqc`` ->
  ``LogsDirectory=imageqc``. Any other folder imageqc writes (state, outputs,
  log) -> ``ReadWritePaths=``; the admin creates it (printed ``install -d``
  line) because a missing one stops the unit. An HPC upload folder ->
  ``ReadWritePaths=-PATH`` (optional: if missing, uploads fail and retry).
- Watch roots -> ``ReadOnlyPaths=-ROOT`` (imageqc never writes there; ``-``:
  a root missing at start is reported by imageqc, it does not stop the unit)
  and ``RequiresMountsFor=ROOT``. Written folders on network mounts get
  ``RequiresMountsFor=`` too.
- ``WatchdogSec`` = max(60, 10 x tick): the service pings every tick; the
  floor leaves room for a slow tick on a stalled network share.
- ``TimeoutStopSec`` = shutdown_timeout_s + 30 s, so a running QC job gets
  its full grace period and the service its time to close the store.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any

from daemon import __version__
from daemon.config import Config, load_config
from daemon.follow import AUTOSTART_NAME, autostart_entry
from daemon.fsinfo import is_network_path, is_unc
from daemon.hosting import ServiceInstallError, config_folders, stop_timeout_seconds

__all__ = [
    "DEFAULT_UNIT_DIR",
    "DEFAULT_USER",
    "SYSTEMD_LOGS_DIR",
    "SYSTEMD_STATE_DIR",
    "UNIT_NAME",
    "ServiceInstallError",
    "SystemdUnit",
    "add_service_parser",
    "build_systemd_unit",
    "cmd_service",
    "config_folders",
    "imageqc_command",
    "install_systemd_unit",
    "next_steps",
    "stop_timeout_seconds",
    "systemd_quote",
    "watchdog_seconds",
]

#: The unit's file name.
UNIT_NAME = "imageqc.service"
#: Where ``service install --systemd`` writes the unit by default.
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
#: XDG autostart folder of all users (GNOME, KDE, Xfce read it at logon).
DEFAULT_AUTOSTART_DIR = Path("/etc/xdg/autostart")
#: The dedicated account the service runs as.
DEFAULT_USER = "imageqc"
#: A state_dir here (or below) is managed by systemd (``StateDirectory=imageqc``).
SYSTEMD_STATE_DIR = PurePosixPath("/var/lib/imageqc")
#: A log file here (or below) is managed by systemd (``LogsDirectory=imageqc``).
SYSTEMD_LOGS_DIR = PurePosixPath("/var/log/imageqc")

_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")

#: Hardening that does not depend on the configuration. What is left out and
#: why (MemoryDenyWriteExecute, PrivateUsers, IPAddressDeny, ProcSubset) is in
#: systemd/README.md.
_HARDENING = """\
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
CapabilityBoundingSet=
AmbientCapabilities=
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
UMask=0027"""


@dataclass(frozen=True)
class SystemdUnit:
    """A generated unit and what an admin must do around it.

    ``text`` is the unit file. ``prepare_dirs`` are folders the service writes
    that systemd does not create (``install -d`` them, owned by the user);
    ``warnings`` are problems with the configuration as a service would see it.
    """

    name: str
    text: str
    config_path: Path
    user: str
    group: str
    command: tuple[str, ...]
    writable: tuple[Path, ...]
    read_only: tuple[Path, ...]
    mounts: tuple[Path, ...]
    state_directory: bool
    logs_directory: bool
    prepare_dirs: tuple[Path, ...]
    watchdog_s: int
    stop_timeout_s: int
    warnings: tuple[str, ...]


# ---------------------------------------------------------------------------
# Numbers shared with the Windows service
# ---------------------------------------------------------------------------


def watchdog_seconds(tick_seconds: float) -> int:
    """``WatchdogSec``: the service pings every tick; 10 ticks, at least 60 s."""
    return max(60, math.ceil(10 * tick_seconds))


# ---------------------------------------------------------------------------
# Quoting (systemd.syntax(7), systemd.unit(5) "Specifiers")
# ---------------------------------------------------------------------------


def _escape_specials(text: str) -> str:
    return text.replace("%", "%%")


def systemd_quote(arg: str, *, command: bool = False) -> str:
    """Quote one word for a unit file; ``%`` is doubled, in commands ``$`` too."""
    text = _escape_specials(arg)
    if command:
        text = text.replace("$", "$$")
    if text and not re.search(r'[\s"\'\\;]', text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _quoted_paths(paths: Iterable[Path], prefix: str = "") -> str:
    return " ".join(systemd_quote(prefix + str(p)) for p in paths)


# ---------------------------------------------------------------------------
# The unit
# ---------------------------------------------------------------------------


def imageqc_command(
    *, executable: str = sys.executable, which: Callable[[str], str | None] = shutil.which
) -> tuple[list[str], str | None]:
    """The command that starts imageqc, and a warning when it is only a fallback.

    The ``imageqc`` script beside this Python (its venv's ``bin``) first, then
    ``imageqc`` on PATH, else ``python -m daemon.cli``.
    """
    exe = Path(os.path.abspath(executable))  # not resolve(): a venv's python is a symlink out of the venv
    beside = exe.parent / ("imageqc.exe" if sys.platform == "win32" else "imageqc")
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)], None
    found = which("imageqc")
    if found:
        return [os.path.abspath(found)], None
    warning = (
        f"no `imageqc` command beside {exe} or on PATH; the unit runs `{exe} -m daemon.cli`, which works only "
        "if imageqc is pip-installed for that Python (install it, e.g. into /opt/imageqc/venv, and run this "
        "command with that venv's imageqc)"
    )
    return [str(exe), "-m", "daemon.cli"], warning


def _under(path: PurePath, base: PurePath) -> bool:
    p, b = PurePosixPath(str(path)), PurePosixPath(str(base))
    return p == b or b in p.parents


def _abs(path: Path | str, base: Path) -> Path:
    p = Path(path).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def _real(path: Path) -> Path:
    """The path with symlinks resolved (mount dependencies and bind mounts follow real paths)."""
    try:
        return path.resolve(strict=False)
    except OSError:  # pragma: no cover - a loop or permission problem: keep it as written
        return path


def _dedupe(paths: Iterable[Path]) -> tuple[Path, ...]:
    """Unique paths in order, dropping any below another one in the list."""
    unique = list(dict.fromkeys(paths))
    return tuple(p for p in unique if not any(q != p and _under(p, q) for q in unique))


def build_systemd_unit(
    config: Config,
    *,
    user: str = DEFAULT_USER,
    group: str | None = None,
    command: Sequence[str] | None = None,
    is_network: Callable[[Path], bool] = is_network_path,
) -> SystemdUnit:
    """Generate the unit for ``config`` (which must come from a file).

    Parameters
    ----------
    config : Config
        Loaded from a file; its paths decide the unit's access and mounts.
    user, group : str
        The dedicated account (group defaults to the user's name).
    command : sequence of str, optional
        What starts imageqc; default :func:`imageqc_command`.
    is_network : callable
        Whether a path lies on a network mount (injected in tests).
    """
    if config.source == "<embedded default>":
        msg = (
            "a service needs a configuration file: pass --config FILE (or set IMAGEQC_CONFIG); "
            "start from `imageqc config example > /etc/imageqc/imageqc.toml`"
        )
        raise ServiceInstallError(msg, exit_code=2)
    group = group or user
    for what, name in (("user", user), ("group", group)):
        if not _USER_RE.match(name):
            raise ServiceInstallError(
                f"{name!r} is not a valid {what} name (lower-case letters, digits, '_', '-')", exit_code=2
            )
    warnings: list[str] = []
    if user == "root":
        warnings.append(
            "running as root defeats most of the unit's hardening; use a dedicated account (the default 'imageqc')"
        )
    config_path = _abs(config.source, Path.cwd())
    base = config_path.parent
    if command is None:
        cmd, fallback = imageqc_command()
        if fallback:
            warnings.append(fallback)
    else:
        cmd = list(command)
    argv = [*cmd, "run", "--config", str(config_path)]

    for label, raw in config_folders(config):
        if is_unc(raw) or PureWindowsPath(raw).drive:
            raise ServiceInstallError(
                f"{label} = {raw!r} is a Windows path; on Linux mount the share and give its mount point", exit_code=2
            )

    for label, raw in [("config", str(config_path)), *config_folders(config)]:
        if any(ord(ch) < 32 for ch in raw):
            raise ServiceInstallError(
                f"{label} = {raw!r} contains a control character (a line break?); a unit file cannot hold it",
                exit_code=2,
            )

    state = _real(_abs(config.state_dir, base))
    outputs = _real(_abs(config.output_dir, base))
    log_dir = _real(_abs(config.log_file, base).parent)
    roots = [_real(_abs(w.path, base)) for w in config.watch]
    hpc = [_real(_abs(t.path, base)) for t in config.upload if t.type == "hpc" and t.mode != "none" and t.path]

    state_directory = _under(state, SYSTEMD_STATE_DIR)
    logs_directory = _under(log_dir, SYSTEMD_LOGS_DIR)
    managed = [SYSTEMD_STATE_DIR] if state_directory else []
    if logs_directory:
        managed.append(SYSTEMD_LOGS_DIR)
    # Folders imageqc writes that systemd does not manage must exist before the unit starts
    # (a missing ReadWritePaths entry stops it with 226/NAMESPACE), so the admin creates them.
    # An HPC upload folder is optional ("-"): if it is missing, uploads fail and retry, QC goes on.
    required = _dedupe(p for p in (state, outputs, log_dir) if not any(_under(p, m) for m in managed))
    optional = tuple(p for p in _dedupe(hpc) if not any(_under(p, m) for m in (*managed, *required)))
    writable = required + optional

    # Not deduplicated by prefix: a mount below another listed path needs its own entry.
    mounts = tuple(dict.fromkeys([*roots, *(p for p in (state, outputs, log_dir, *hpc) if is_network(p))]))
    read_only = _dedupe(roots)
    warnings += _path_warnings(config_path, [*roots, state, outputs, log_dir, *hpc], roots, writable)

    watchdog = watchdog_seconds(config.service.tick_seconds)
    stop_timeout = stop_timeout_seconds(config)
    env_value = f"IMAGEQC_CONFIG={config_path}"
    service_lines = [
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=" + " ".join(systemd_quote(a, command=True) for a in argv),
        "Environment=" + systemd_quote(env_value),
        "Environment=PYTHONUNBUFFERED=1",
        "WorkingDirectory=" + _escape_specials(str(base)),
        f"User={user}",
        f"Group={group}",
        "SyslogIdentifier=imageqc",
    ]
    if state_directory:
        service_lines += ["StateDirectory=imageqc", "StateDirectoryMode=0750"]
    if logs_directory:
        service_lines += ["LogsDirectory=imageqc", "LogsDirectoryMode=0750"]
    if writable:
        service_lines.append(
            "ReadWritePaths=" + " ".join(filter(None, [_quoted_paths(required), _quoted_paths(optional, prefix="-")]))
        )
    if read_only:
        service_lines.append("ReadOnlyPaths=" + _quoted_paths(read_only, prefix="-"))
    service_lines += [
        f"WatchdogSec={watchdog}",
        "TimeoutStartSec=180",
        f"TimeoutStopSec={stop_timeout}",
        "KillMode=mixed",
        "Restart=on-failure",
        "RestartSec=10",
        _HARDENING,
    ]
    unit_lines = [
        "Description=imageqc: image QC and upload for Stereo-seq scans",
        "Wants=network-online.target",
        "After=network-online.target remote-fs.target",
    ]
    if mounts:
        unit_lines.append("RequiresMountsFor=" + _quoted_paths(mounts))
    unit_lines += ["StartLimitIntervalSec=600", "StartLimitBurst=5"]
    header = [
        f"# {UNIT_NAME}: generated by `imageqc service install --systemd` from",
        f"# {config_path}",
        "# Regenerate it after changing folders in the config (see systemd/README.md).",
        f"# The service pings the watchdog every {config.service.tick_seconds:g} s tick; a clean stop may take",
        f"# service.shutdown_timeout_s ({config.service.shutdown_timeout_s:g} s) for the running QC job plus 30 s.",
    ]
    text = "\n".join(
        [
            *header,
            "",
            "[Unit]",
            *unit_lines,
            "",
            "[Service]",
            *service_lines,
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )
    return SystemdUnit(
        name=UNIT_NAME,
        text=text,
        config_path=config_path,
        user=user,
        group=group,
        command=tuple(argv),
        writable=writable,
        read_only=read_only,
        mounts=mounts,
        state_directory=state_directory,
        logs_directory=logs_directory,
        prepare_dirs=required,
        watchdog_s=watchdog,
        stop_timeout_s=stop_timeout,
        warnings=tuple(dict.fromkeys(warnings)),
    )


def _path_warnings(
    config_path: Path, paths: Sequence[Path], roots: Sequence[Path], writable: Sequence[Path]
) -> list[str]:
    out = []
    for p in (*paths, config_path):
        tmp = next((t for t in (Path("/tmp"), Path("/var/tmp")) if _under(p, t)), None)
        if tmp is not None:
            out.append(
                f"{p} is under {tmp}, which the service sees as its own empty folder (PrivateTmp=yes); use a folder elsewhere"
            )
    for root in roots:
        if any(_under(w, root) for w in writable):
            out.append(
                f"watch root {root} contains a folder imageqc writes; keep state and outputs outside the watched folders"
            )
    return out


def install_systemd_unit(unit: SystemdUnit, unit_dir: Path = DEFAULT_UNIT_DIR) -> tuple[Path, bool]:
    """Write the unit file (atomically, mode 0644); returns its path and whether it changed."""
    unit_dir = Path(unit_dir)
    if not unit_dir.is_dir():
        raise ServiceInstallError(
            f"the unit folder {unit_dir} does not exist; is this a systemd machine? (--unit-dir DIR)"
        )
    target = unit_dir / unit.name
    if target.is_file() and target.read_text(encoding="utf-8") == unit.text:
        return target, False
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{unit.name}.", dir=unit_dir)
    except PermissionError:
        msg = f"cannot write to {unit_dir}: run this command with sudo, or print the unit with --dry-run and install it yourself"
        raise ServiceInstallError(msg) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(unit.text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target, True


def next_steps(unit: SystemdUnit) -> list[str]:
    """The root commands that finish the installation, in order."""
    user, group = unit.user, unit.group
    home = SYSTEMD_STATE_DIR if unit.state_directory or not unit.prepare_dirs else unit.prepare_dirs[0]
    steps = [
        f"getent passwd {user} >/dev/null || useradd --system --user-group --home-dir {_sh(str(home))} "
        f"--no-create-home --shell /usr/sbin/nologin {user}",
    ]
    if group != user:
        steps.append(f"getent group {group} >/dev/null || groupadd --system {group}")
    steps += [f"install -d -m 0750 -o {user} -g {group} {_sh(str(p))}" for p in unit.prepare_dirs]
    steps += [
        f"chgrp {group} {_sh(str(unit.config_path))} && chmod 0640 {_sh(str(unit.config_path))}",
        "systemctl daemon-reload",
        f"systemctl enable --now {unit.name}",
    ]
    return steps


def _sh(text: str) -> str:
    import shlex

    return shlex.quote(text)


# ---------------------------------------------------------------------------
# The `imageqc service` command
# ---------------------------------------------------------------------------


def add_service_parser(sub: Any) -> None:
    """Add ``imageqc service install|remove|start|stop`` to the CLI's subparsers."""
    sp = sub.add_parser(
        "service",
        help="Install, remove, start or stop imageqc as a systemd unit or Windows service.",
        description="Install imageqc as a service: a systemd unit on Linux (systemd/README.md), "
        "a Windows service on Windows (windows_service/README.md).",
    )
    ssub = sp.add_subparsers(dest="service_command", metavar="ACTION")
    ssub.required = True

    def action(name: str, help: str) -> argparse.ArgumentParser:
        ap: argparse.ArgumentParser = ssub.add_parser(name, help=help, description=help)
        kind = ap.add_mutually_exclusive_group()
        kind.add_argument(
            "--systemd", dest="kind", action="store_const", const="systemd", help="a systemd unit (default on Linux)"
        )
        kind.add_argument(
            "--windows",
            dest="kind",
            action="store_const",
            const="windows",
            help="a Windows service (default on Windows)",
        )
        ap.set_defaults(func=cmd_service)
        return ap

    ip = action(
        "install", "Install the service for a config file (systemd: write the unit and print the next commands)."
    )
    ip.add_argument(
        "--config", "-c", metavar="FILE", help="the config file (default: $IMAGEQC_CONFIG); required for a service"
    )
    ip.add_argument(
        "--dry-run", action="store_true", help="systemd: print the unit and the next commands, write nothing"
    )
    ip.add_argument(
        "--user", default=DEFAULT_USER, help=f"systemd: the account the service runs as (default {DEFAULT_USER})"
    )
    ip.add_argument("--group", help="systemd: its group (default: same as --user)")
    ip.add_argument(
        "--unit-dir",
        type=Path,
        default=DEFAULT_UNIT_DIR,
        help=f"systemd: where to write {UNIT_NAME} (default {DEFAULT_UNIT_DIR})",
    )
    ip.add_argument(
        "--username",
        metavar="ACCOUNT",
        help="Windows: run as this account (DOMAIN\\user, or a gMSA ending in $); default LocalSystem",
    )
    ip.add_argument(
        "--startup",
        choices=["delayed", "auto", "manual"],
        default="delayed",
        help="Windows: start type (default delayed automatic)",
    )
    ip.add_argument(
        "--follow-at-logon",
        action="store_true",
        help="also start `imageqc follow --notify` at every desktop logon, so technicians see verdicts as notifications "
        "(Linux: an XDG autostart file; Windows: a shortcut in the all-users Startup folder)",
    )
    ip.add_argument(
        "--autostart-dir",
        type=Path,
        default=DEFAULT_AUTOSTART_DIR,
        help=f"Linux: where --follow-at-logon writes its autostart file (default {DEFAULT_AUTOSTART_DIR})",
    )
    rp = action("remove", "Remove the service (systemd: print the commands that do it).")
    rp.add_argument("--unit-dir", type=Path, default=DEFAULT_UNIT_DIR, help=f"systemd: where {UNIT_NAME} is")
    rp.add_argument(
        "--autostart-dir",
        type=Path,
        default=DEFAULT_AUTOSTART_DIR,
        help="Linux: where a --follow-at-logon autostart file is",
    )
    action("start", "Start the service (Windows; on Linux use systemctl).")
    action("stop", "Stop the service (Windows; on Linux use systemctl).")


def _kind(args: argparse.Namespace) -> str:
    native = "windows" if sys.platform == "win32" else "systemd"
    kind = getattr(args, "kind", None) or native
    if kind != native:
        raise ServiceInstallError(
            f"--{kind} services are managed on {'Windows' if kind == 'windows' else 'Linux'}; run this command there",
            exit_code=2,
        )
    return kind


def cmd_service(args: argparse.Namespace) -> int:
    kind = _kind(args)
    action = args.service_command
    if kind == "windows":  # pragma: no cover - exercised through windows_service.manage with fakes
        from windows_service import manage

        return manage.cli_action(args)
    if action == "install":
        return _systemd_install(args)
    if action == "remove":
        unit_path = Path(args.unit_dir) / UNIT_NAME
        print("Run as root:")
        autostart = Path(args.autostart_dir) / AUTOSTART_NAME
        for step in (
            f"systemctl disable --now {UNIT_NAME}",
            f"rm -f {_sh(str(unit_path))} {_sh(str(autostart))}",
            "systemctl daemon-reload",
        ):
            print(f"  {step}")
        print("The state folder, outputs and logs are kept; delete them yourself if they are no longer needed.")
        return 0
    raise ServiceInstallError(
        f"on Linux systemd runs the service: use `sudo systemctl {action} {UNIT_NAME}`", exit_code=2
    )


def _systemd_install(args: argparse.Namespace) -> int:
    path = args.config or os.environ.get("IMAGEQC_CONFIG") or None
    config = load_config(path) if path else load_config(None)
    unit = build_systemd_unit(config, user=args.user, group=args.group)
    out = sys.stdout
    for w in unit.warnings:
        print(f"warning: {w}", file=sys.stderr)
    autostart = None
    if args.follow_at_logon:
        command, _warning = imageqc_command()
        autostart = autostart_entry([*command, "follow", "--notify", "--config", str(unit.config_path)])
    if args.dry_run:
        out.write(unit.text)
        print(f"\n# Would write {Path(args.unit_dir) / unit.name}. Then, as root:", file=out)
        for step in next_steps(unit):
            print(f"#   {step}", file=out)
        if autostart is not None:
            print(f"\n# Would write {Path(args.autostart_dir) / AUTOSTART_NAME}:", file=out)
            out.write(autostart)
        return 0
    target, changed = install_systemd_unit(unit, Path(args.unit_dir))
    if autostart is not None:
        folder = Path(args.autostart_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / AUTOSTART_NAME).write_text(autostart, encoding="utf-8")
        print(
            f"wrote {folder / AUTOSTART_NAME}: at each desktop logon `imageqc follow --notify` shows new verdicts "
            f"(the desktop users need read access to {unit.config_path} and the state folder)"
        )
    print(f"{'wrote' if changed else 'unchanged'} {target} (imageqc {__version__}, config {unit.config_path})")
    print("Next, as root:")
    for step in next_steps(unit):
        print(f"  {step}")
    if changed:
        print(f"If it was already running: systemctl restart {unit.name}")
    print(
        f"Check it: systemctl status {unit.name}; IMAGEQC_CONFIG={_sh(str(unit.config_path))} imageqc status; journalctl -u {unit.name}"
    )
    return 0
