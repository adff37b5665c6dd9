"""Uploads: one small interface (:class:`~daemon.upload.base.Uploader`), three
implementations (s3, oss, hpc), the policy that drives them and the service
component (:class:`~daemon.upload.manager.UploadManager`)."""

from __future__ import annotations

from pathlib import Path

from daemon.config import UploadTarget
from daemon.upload.base import Uploader
from daemon.upload.credentials import Credentials

__all__ = ["make_uploader"]


def make_uploader(target: UploadTarget, *, state_dir: Path, credentials: Credentials | None = None) -> Uploader:
    """The uploader for a configured target (credentials resolved unless given)."""
    if target.type == "s3":
        from daemon.upload.s3 import S3Uploader

        return S3Uploader(target, state_dir=state_dir, credentials=credentials)
    if target.type == "oss":
        from daemon.upload.oss import OSSUploader

        return OSSUploader(target, state_dir=state_dir, credentials=credentials)
    if target.type == "hpc":
        from daemon.upload.hpc import HPCUploader

        return HPCUploader(target, state_dir=state_dir, credentials=credentials)
    msg = f"unknown upload type {target.type!r}"
    raise ValueError(msg)
