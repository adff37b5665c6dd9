"""Where an upload target's credentials come from. Never the config, the database or the log.

``upload[].credentials`` names a source, not a secret:

``""``
    The platform's standard chain. s3: boto3's (``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY``, ``~/.aws/credentials``, instance roles...);
    oss: ``OSS_ACCESS_KEY_ID`` / ``OSS_ACCESS_KEY_SECRET`` (or the
    ``ALIBABA_CLOUD_*`` pair), then ``~/.alibabacloud/credentials``.
``"env"``
    Only the platform's environment variables (no files).
``"env:PREFIX"``
    ``PREFIX_ACCESS_KEY_ID`` and ``PREFIX_SECRET_ACCESS_KEY`` (or
    ``PREFIX_ACCESS_KEY_SECRET``), optional ``PREFIX_SESSION_TOKEN``.
``"file:PATH"``
    An INI file; section ``[default]`` (or the only one) with
    ``access_key_id`` and ``secret_access_key`` (``aws_*`` and
    ``access_key_secret`` spellings accepted), optional ``session_token``.
``"profile:NAME"``
    s3: that profile of ``~/.aws/credentials``/``~/.aws/config``; oss: that
    section of ``~/.alibabacloud/credentials``.

Every secret found is registered with :func:`daemon.logging.register_secret`,
so no log line can carry it.
"""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass
from pathlib import Path

from daemon.config import UploadTarget
from daemon.errors import PermanentUploadError
from daemon.logging import register_secret

__all__ = ["ALIYUN_CREDENTIALS_FILE", "Credentials", "resolve_credentials"]

#: Aliyun's shared credentials file (``ALIBABA_CLOUD_CREDENTIALS_FILE`` overrides it).
ALIYUN_CREDENTIALS_FILE = Path("~/.alibabacloud/credentials")

_ENV = {
    "s3": (("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),),
    "oss": (
        ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN"),
        ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "ALIBABA_CLOUD_SECURITY_TOKEN"),
    ),
}


@dataclass(frozen=True)
class Credentials:
    """Resolved keys, or a named profile for boto3 to read itself.

    ``repr`` never shows the secret.
    """

    access_key_id: str | None = None
    secret: str | None = None
    token: str | None = None
    profile: str | None = None
    source: str = ""

    def __repr__(self) -> str:
        return f"Credentials(access_key_id={self.access_key_id!r}, profile={self.profile!r}, source={self.source!r})"

    __str__ = __repr__


def _keys(key_id: str | None, secret: str | None, token: str | None, source: str) -> Credentials:
    register_secret(secret)
    register_secret(token)
    return Credentials(access_key_id=key_id, secret=secret, token=token or None, source=source)


def resolve_credentials(
    target: UploadTarget, *, environ: dict[str, str] | None = None, home: Path | None = None
) -> Credentials:
    """Resolve ``target.credentials``; raises :class:`PermanentUploadError` with the fix.

    An empty :class:`Credentials` (no keys, no profile) means "let boto3 use
    its own chain" (s3 only; oss always needs keys).
    """
    env = dict(os.environ) if environ is None else environ
    spec = target.credentials.strip()
    kind = target.type
    if kind == "hpc":
        return Credentials(source="the operating system (share permissions)")
    if spec.startswith("env:"):
        prefix = spec[4:]
        names = (f"{prefix}_ACCESS_KEY_ID", f"{prefix}_SECRET_ACCESS_KEY")
        key_id, secret = env.get(names[0]), env.get(names[1]) or env.get(f"{prefix}_ACCESS_KEY_SECRET")
        if not key_id or not secret:
            missing = [n for n, v in zip(names, (key_id, secret), strict=False) if not v]
            raise PermanentUploadError(
                target.name,
                f"credentials 'env:{prefix}': {' and '.join(missing)} not set in the service's environment",
                hint=f"set {names[0]} and {names[1]} for the service (systemd Environment=, Windows service environment)",
            )
        return _keys(key_id, secret, env.get(f"{prefix}_SESSION_TOKEN"), f"environment {prefix}_*")
    if spec.startswith("file:"):
        return _from_file(target, Path(spec[5:]).expanduser(), section=None)
    if spec.startswith("profile:"):
        name = spec[8:]
        if kind == "s3":
            return Credentials(profile=name, source=f"AWS profile {name!r}")
        path = Path(env.get("ALIBABA_CLOUD_CREDENTIALS_FILE") or _home(home, ALIYUN_CREDENTIALS_FILE))
        return _from_file(target, path, section=name)
    if spec in ("", "env"):
        for id_name, secret_name, token_name in _ENV[kind]:
            if env.get(id_name) and env.get(secret_name):
                return _keys(env[id_name], env[secret_name], env.get(token_name), f"environment {id_name}")
        if kind == "s3":
            return Credentials(source="boto3's default chain")  # boto3 reads its files itself
        path = Path(env.get("ALIBABA_CLOUD_CREDENTIALS_FILE") or _home(home, ALIYUN_CREDENTIALS_FILE))
        if spec == "" and path.is_file():
            return _from_file(target, path, section="default")
        raise PermanentUploadError(
            target.name,
            "no OSS credentials found (OSS_ACCESS_KEY_ID/OSS_ACCESS_KEY_SECRET unset"
            + ("" if spec else f", no {path}")
            + ")",
            hint="set them for the service, or point upload.credentials at 'file:PATH' or 'env:PREFIX'",
        )
    raise PermanentUploadError(
        target.name,
        f"unknown credentials source {spec!r}",
        hint="use '', 'env', 'env:PREFIX', 'file:PATH' or 'profile:NAME'",
    )


def _home(home: Path | None, rel: Path) -> Path:
    if home is None:
        return rel.expanduser()
    return home / Path(*rel.parts[1:])


def _from_file(target: UploadTarget, path: Path, *, section: str | None) -> Credentials:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        raise PermanentUploadError(
            target.name,
            f"credentials file {path} not found",
            hint="create it (INI: access_key_id, secret_access_key) or fix upload.credentials",
        ) from None
    except (OSError, configparser.Error) as e:
        raise PermanentUploadError(
            target.name,
            f"cannot read credentials file {path}: {type(e).__name__}",
            hint="it must be an INI file readable by the service",
        ) from None
    sections = parser.sections()
    if section is None:
        section = "default" if "default" in sections else (sections[0] if len(sections) == 1 else "default")
    if section not in sections:
        raise PermanentUploadError(
            target.name,
            f"credentials file {path} has no [{section}] section",
            hint=f"add [{section}] with access_key_id and secret_access_key",
        )
    sec = parser[section]

    def first(*names: str) -> str | None:
        for n in names:
            value = sec.get(n)
            if value:
                return value.strip()
        return None

    key_id = first("access_key_id", "aws_access_key_id")
    secret = first("secret_access_key", "aws_secret_access_key", "access_key_secret")
    register_secret(secret)
    if not key_id or not secret:
        raise PermanentUploadError(
            target.name,
            f"credentials file {path} [{section}] lacks access_key_id or secret_access_key",
            hint="add both keys to that section",
        )
    return _keys(
        key_id, secret, first("session_token", "aws_session_token", "security_token"), f"file {path} [{section}]"
    )
