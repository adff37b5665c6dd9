"""Credentials come from the environment, the platforms' files or a file the config names; never logged."""

from __future__ import annotations

import pytest

from daemon.config import UploadTarget
from daemon.errors import PermanentUploadError
from daemon.logging import redact
from daemon.upload.credentials import resolve_credentials


def target(kind="s3", credentials="", **kw):
    base = {"name": "t", "type": kind, "credentials": credentials}
    if kind in ("s3", "oss"):
        base["bucket"] = "b"
    return UploadTarget(**{**base, **kw})


def test_env_prefix_reads_the_two_variables_and_registers_the_secret():
    env = {
        "LAB_ACCESS_KEY_ID": "AKIALAB",
        "LAB_SECRET_ACCESS_KEY": "lab-secret-value-1",
        "LAB_SESSION_TOKEN": "tok-123456",
    }
    c = resolve_credentials(target(credentials="env:LAB"), environ=env)
    assert (c.access_key_id, c.secret, c.token) == ("AKIALAB", "lab-secret-value-1", "tok-123456")
    assert "lab-secret-value-1" not in repr(c) and "lab-secret-value-1" not in str(c)
    assert redact("boto said lab-secret-value-1 and tok-123456") == "boto said *** and ***"


def test_env_prefix_missing_names_the_variables_to_set():
    with pytest.raises(PermanentUploadError, match="LAB_SECRET_ACCESS_KEY not set") as err:
        resolve_credentials(target(credentials="env:LAB"), environ={"LAB_ACCESS_KEY_ID": "x"})
    assert "upload target 't'" in str(err.value)


def test_a_credentials_file_in_ini_form(tmp_path):
    f = tmp_path / "oss.ini"
    f.write_text("[default]\naccess_key_id = LTAIfile\naccess_key_secret = file-secret-value\n")
    c = resolve_credentials(target("oss", f"file:{f}", endpoint="https://oss-cn-shenzhen.aliyuncs.com"), environ={})
    assert (c.access_key_id, c.secret) == ("LTAIfile", "file-secret-value")
    assert redact("file-secret-value") == "***"
    f.write_text("[default]\naccess_key_id = only-the-id\n")
    with pytest.raises(PermanentUploadError, match="lacks access_key_id or secret_access_key"):
        resolve_credentials(target(credentials=f"file:{f}"), environ={})
    with pytest.raises(PermanentUploadError, match="not found"):
        resolve_credentials(target(credentials=f"file:{tmp_path / 'nope.ini'}"), environ={})


def test_the_standard_chains(tmp_path):
    # s3: AWS variables, else boto3's own chain (files, roles)
    c = resolve_credentials(
        target(), environ={"AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": "aws-env-secret"}
    )
    assert c.access_key_id == "AKIAENV"
    assert resolve_credentials(target(), environ={}).access_key_id is None
    assert resolve_credentials(target(credentials="profile:lab"), environ={}).profile == "lab"
    # oss: OSS variables, else ~/.alibabacloud/credentials
    oss = target("oss", endpoint="https://oss-cn-hangzhou.aliyuncs.com")
    c = resolve_credentials(oss, environ={"OSS_ACCESS_KEY_ID": "LTAIenv", "OSS_ACCESS_KEY_SECRET": "oss-env-secret"})
    assert c.secret == "oss-env-secret"
    home = tmp_path / "home"
    (home / ".alibabacloud").mkdir(parents=True)
    (home / ".alibabacloud" / "credentials").write_text(
        "[default]\ntype = access_key\naccess_key_id = LTAIhome\naccess_key_secret = home-secret-value\n"
        "[lab]\naccess_key_id = LTAIlab\naccess_key_secret = lab-profile-secret\n"
    )
    assert resolve_credentials(oss, environ={}, home=home).access_key_id == "LTAIhome"
    assert (
        resolve_credentials(target("oss", "profile:lab", endpoint="https://x"), environ={}, home=home).access_key_id
        == "LTAIlab"
    )
    with pytest.raises(PermanentUploadError, match="no OSS credentials found"):
        resolve_credentials(oss, environ={}, home=tmp_path / "empty-home")


def test_hpc_needs_no_credentials():
    assert resolve_credentials(target("hpc", path="/mnt/share"), environ={}).secret is None
