"""Configuration: TOML -> frozen dataclasses, validated when loaded.

Every setting is a dataclass field with a default and a ``help`` text; the
loader walks the dataclasses, so a new setting needs one field and nothing
else. Errors name the file, the key path and the line, and say what to do::

    site.toml:14: watch[0].settle_seconds: must be >= 0 (got -5)

With no file, :data:`DEFAULT_TOML` (watch ``./inbox``, state in
``./.imageqc/``, no upload) is used, relative to the working directory.
Relative paths in a file are relative to that file's folder.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from daemon.errors import ConfigError, ConfigErrors
from daemon.fsinfo import is_unc

__all__ = [
    "DEFAULT_TOML",
    "NOTIFY_EVENTS",
    "Config",
    "DiscoveryConfig",
    "FleetConfig",
    "LiveConfig",
    "LoggingConfig",
    "NotifyConfig",
    "NotifyRule",
    "OutputConfig",
    "QCConfig",
    "ServiceConfig",
    "SiteConfig",
    "Thresholds",
    "UploadTarget",
    "WatchRoot",
    "WebConfig",
    "config_to_dict",
    "default_config",
    "is_loopback",
    "iter_fields",
    "load_config",
    "load_config_text",
    "parse_bandwidth",
    "parse_clock",
    "parse_listen",
    "parse_window",
]


def _f(default: Any, help: str, **rules: Any) -> Any:
    """A config field: its default, a help text and validation rules."""
    meta = {"help": help, **rules}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.copy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _sub(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass(frozen=True)
class SiteConfig:
    name: str = _f("default", "Site name; goes into upload keys and reports.", pattern=r"^[A-Za-z0-9._-]+$")
    operator: str = _f("", "Default operator recorded in reports when the scan set does not name one.")


@dataclass(frozen=True)
class WatchRoot:
    path: Path = _f(Path("inbox"), "Folder the microscope exports into (local path, mount or UNC share).")
    recursive: bool = _f(True, "Also look in sub-folders.")
    observer: str = _f(
        "auto",
        "native: OS file events; polling: periodic listing; auto: polling for network paths, else native.",
        choices=("auto", "native", "polling"),
    )
    settle_seconds: float = _f(
        60.0, "A scan set is complete when nothing in it changed for this long.", min=0, max=86400
    )
    ignore: tuple[str, ...] = _f(
        ("~*", ".*", "*.tmp", "*.part"), "Name patterns never considered (glob, matched on each path part)."
    )
    marker: str = _f(
        "",
        "If set (e.g. '{chip}.done'), a scan set is complete when this file appears, whatever else.",
    )
    naming: str = _f(
        "strict",
        "strict: names that are not chip serials are reported once and ignored; lenient: accepted with a warning.",
        choices=("strict", "lenient"),
    )
    stain: str = _f(
        "auto",
        "Stain of nuclear images under this root: auto (RGB -> HE, grey -> DAPI), DAPI, ssDNA or HE.",
        choices=("auto", "DAPI", "ssDNA", "HE"),
    )
    tile_pattern: str = _f(
        "",
        "Regex with named groups 'row' and 'col' (or 'index', row-major) for tile folders that follow no known "
        "convention and have no TileConfiguration.txt.",
        regex=True,
    )
    tile_overlap: tuple[float, ...] = _f(
        (0.1, 0.1),
        "Fractional overlap [x, y] of neighbouring tiles (one number: both) for tile folders whose files give "
        "neither positions (TileConfiguration.txt) nor overlap (metadata); the stitching refines from it.",
        min=0,
        max=0.9,
        items=(1, 2),
    )

    @property
    def tile_overlap_xy(self) -> tuple[float, float]:
        """:attr:`tile_overlap` as (x, y)."""
        return (self.tile_overlap[0], self.tile_overlap[-1])


@dataclass(frozen=True)
class DiscoveryConfig:
    rescan_interval_s: float = _f(
        60.0, "Full reconciliation rescan of every root, seconds (the source of truth).", min=1, max=86400
    )
    poll_interval_s: float = _f(5.0, "Polling observer interval, seconds.", min=0.1, max=3600)
    grouping_window_s: float = _f(
        60.0,
        "Wait this long after a chip's newest member appeared before queueing, so IF images exported a little "
        "later join the set (DAPI+mIF). Up to the settle time this adds no delay; raise it if IF exports lag more.",
        min=0,
        max=86400,
    )
    incomplete_timeout_s: float = _f(
        3600.0,
        "Report a scan set that never completes (e.g. a truncated TIFF) after this long, once.",
        min=1,
        max=30 * 86400,
    )


@dataclass(frozen=True)
class Thresholds:
    track: float = _f(60.0, "Track-line score needed to pass (required metric).", min=0, max=100)
    clarity: float = _f(
        80.0, "Clarity score below which an advisory is given (never fails QC by itself).", min=0, max=100
    )
    stitching: float = _f(60.0, "Stitching score needed to pass (required for DAPI+mIF tile sets).", min=0, max=100)
    calibration_offset_px: float = _f(20.0, "Largest DAPI-IF offset that passes, in pixels.", min=0, max=100000)
    calibration_similarity: float = _f(0.01, "Smallest DAPI-IF similarity that passes (0-1).", min=0, max=1)


@dataclass(frozen=True)
class QCConfig:
    thresholds: Thresholds = _sub(Thresholds, "Pass criteria (StereoMap's published defaults).")
    stitching_required: bool = _f(False, "Make stitching decide the verdict for every stain, not only DAPI+mIF.")
    stitching_stage_limit_px: float = _f(
        0.0,
        "Largest stage error of a tile (off its nominal position along x or y, relative to the set) that "
        "stitching passes, in pixels; 0 = a third of the tile's narrowest overlap with a neighbour.",
        min=0,
        max=100000,
    )
    threads: int = _f(2, "Threads QC may use (numpy/OpenCV/onnxruntime).", min=1, max=256)
    priority: str = _f(
        "low",
        "Process priority of the QC worker, so the microscope software is never starved.",
        choices=("low", "below_normal", "normal"),
    )
    memory_limit_mb: int = _f(
        4096, "Address-space limit of the QC worker where the OS supports it (0 = none).", min=0, max=1 << 22
    )
    timeout_s: float = _f(1800.0, "A QC run taking longer than this is stopped and the job failed.", min=10, max=86400)
    worker_jobs: int = _f(
        50,
        "Jobs one warm QC worker process runs before it is replaced (imports and model are loaded once per "
        "worker, not per job); 1 = a fresh process for every job. A worker that is stopped (timeout, memory "
        "limit, cancel) or crashes is always replaced.",
        min=1,
        max=100000,
    )
    max_dimension: int = _f(400_000, "Refuse images whose header declares a side longer than this (pixels).", min=1)
    max_pixels: int = _f(40_000_000_000, "Refuse images whose header declares more pixels than this.", min=1)
    max_archive_gb: float = _f(
        64.0,
        "Refuse a QC archive (.tar.gz) whose members add up to more than this, uncompressed (GiB); checked "
        "from the tar headers before anything is expanded.",
        min=0.001,
        max=1 << 20,
    )
    model: str = _f(
        "",
        "Clarity model: a sidecar .json describing a model, or an .onnx file used with model_preset and "
        "model_classes; empty = the model shipped with imageqc.",
        path=True,
    )
    model_preset: str = _f(
        "",
        "Input layout and normalisation of a known .onnx model: '' (from the sidecar) or 'stomics-4class' "
        "(STOmics' published MobileNetV3 clarity model).",
        choices=("", "stomics-4class"),
    )
    model_classes: dict[str, str] = _f(
        {},
        "Class mapping for an .onnx model: its output class names, in order, each -> good, mild_blur, "
        "severe_blur, mild_overexposure, severe_overexposure or background. Empty = the preset's.",
    )


@dataclass(frozen=True)
class OutputConfig:
    dir: str = _f("", "Folder for QC outputs (report, pictures, archive); empty = <state_dir>/outputs.", path=True)
    archive: bool = _f(
        True,
        "Write <chip>_<YYYYMMDD>_<HHMMSS>_<version>.tar.gz per run: the archive SAW takes (saw count --image-tar), with SAW's IPR, the images and imageqc's report and pictures.",
    )
    pictures: bool = _f(True, "Write the overlay pictures (track grid, clarity map, stitching and IF overlays).")
    archive_level: int = _f(
        0,
        "gzip level of the archive: 0 stores the images as they are (as fast as copying them), 1-3 compress them (about a third smaller raw, several times slower).",
        min=0,
        max=3,
    )
    include_images: bool = _f(
        True,
        "Put the input images into the archive, as SAW needs them; false keeps only the IPR, report and pictures (small, but SAW cannot use it).",
    )
    fused_image: bool = _f(
        False,
        "Also write the stitched image of each tile set (tile folder, CZI mosaic) into the run's output folder as <group>_fov_stitched.tif (SAW's name for a stitched image of FOVs: DAPI_fov_stitched.tif, ssDNA_, HE_, <name>_IF_): a tiled, pyramidal OME-TIFF with the tiles at the positions stitching registered (a tile it could not register, or every tile when stitching could not run, at its nominal position) and linear blending in the overlaps; report.json lists it under outputs. Like the folder's other files it goes into the archive under imageqc/, which grows by about the size of the tiles. Images that are one file already are not rewritten.",
    )


@dataclass(frozen=True)
class UploadTarget:
    name: str = _f(
        "",
        "A short name for this target, used in logs, status and the store.",
        required=True,
        pattern=r"^[A-Za-z0-9._-]+$",
    )
    type: str = _f(
        "s3",
        "s3 (AWS or S3-compatible), oss (Aliyun OSS) or hpc (mounted path or UNC share).",
        choices=("s3", "oss", "hpc"),
    )
    mode: str = _f(
        "outputs",
        "What to upload: none, inputs (the images), outputs (the QC archive) or all.",
        choices=("none", "inputs", "outputs", "all"),
    )
    endpoint: str = _f("", "Endpoint URL (S3-compatible or OSS); empty = AWS default for s3.")
    region: str = _f("", "Region (s3: e.g. eu-west-1; oss: e.g. cn-hangzhou).")
    bucket: str = _f("", "Bucket name (s3, oss).")
    path: str = _f("", "Destination folder (hpc): a mounted path or a UNC share.", path=True)
    prefix: str = _f("", "Key prefix inside the bucket or folder.")
    key_template: str = _f(
        "{prefix}/{site}/{chip}/{run}/{name}",
        "Remote key layout; fields: prefix, site, chip, run, name, kind (inputs|outputs), date.",
    )
    addressing_style: str = _f("auto", "s3 addressing: auto, path or virtual.", choices=("auto", "path", "virtual"))
    window: str = _f(
        "",
        "Only start uploads inside this daily window, in the PC's local time, e.g. '20:00-06:00'; when it closes, "
        "parts in flight finish and the rest resumes at the next opening. Empty = any time.",
    )
    bandwidth_limit: str = _f(
        "",
        "Cap on this target's upload rate, shared by all its transfers, e.g. '20MB/s' or '100Mbit/s'; empty = unlimited.",
    )
    concurrency: int = _f(
        0,
        "Requests (parts or whole files) in flight at once for this target; 0 = automatic (10).",
        min=1,
        max=64,
        zero_is_auto=True,
    )
    part_size_mb: int = _f(
        0,
        "Multipart part size, MiB; 0 = chosen from each file's size (8 MiB, larger so a file needs at most 2,000 "
        "parts). Files up to one part are sent in a single PUT.",
        min=5,
        max=5120,
        zero_is_auto=True,
    )
    max_attempts: int = _f(
        8,
        "Attempts of each request for transient errors (network loss, 5xx, timeouts) before the file counts as failed; "
        "the job is then retried with the service's backoff, up to service.max_attempts times.",
        min=1,
        max=100,
    )
    retry_base_s: float = _f(
        1.0,
        "First wait after a transient error (network loss, 5xx, timeout); doubles each attempt, with jitter.",
        min=0,
        max=3600,
    )
    retry_max_s: float = _f(60.0, "Longest wait between two attempts of one request.", min=0, max=86400)
    timeout_s: float = _f(60.0, "Connect and read timeout of each request, seconds.", min=1, max=3600)
    checksum: str = _f(
        "auto",
        "Checksum each part carries (s3), declared when a multipart upload starts: crc32 (x-amz-checksum-crc32, "
        "as boto3 sends; cheap to compute, AWS and MinIO check it), sha256 (x-amz-checksum-sha256; a second "
        "SHA-256 pass), md5 (Content-MD5 alone, understood by every S3-compatible server) or auto (crc32; a "
        "server that refuses x-amz-checksum headers gets md5 from then on, remembered for the target in the state "
        "folder). Parts also carry Content-MD5 unless the server's ETag is the whole file's MD5 (rclone).",
        choices=("auto", "md5", "sha256", "crc32"),
    )
    credentials: str = _f(
        "",
        "Where credentials come from: '' (the platform's standard chain), 'env:PREFIX' (PREFIX_ACCESS_KEY_ID, "
        "PREFIX_SECRET_ACCESS_KEY), 'file:PATH' (an INI file), or 'profile:NAME'. Never the secret itself.",
    )
    verify_tls: bool = _f(True, "Verify the endpoint's TLS certificate.")


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _f(
        "info", "Lowest level written: debug, info, warning, error.", choices=("debug", "info", "warning", "error")
    )
    file: str = _f("", "JSON-lines log file; empty = <state_dir>/logs/imageqc.jsonl.", path=True)
    max_bytes: int = _f(10_000_000, "Rotate the log file at this size.", min=10_000)
    backups: int = _f(5, "Rotated log files kept.", min=0, max=1000)
    console: str = _f(
        "auto",
        "Console output: auto (pretty on a terminal, JSON otherwise), pretty, json or off.",
        choices=("auto", "pretty", "json", "off"),
    )


@dataclass(frozen=True)
class ServiceConfig:
    tick_seconds: float = _f(2.0, "How often the service looks for due jobs, seconds.", min=0.05, max=3600)
    lease_seconds: float = _f(
        120.0, "A running job whose worker stops renewing its lease for this long is re-queued.", min=5, max=86400
    )
    workers: int = _f(1, "QC jobs run at the same time.", min=1, max=16)
    max_attempts: int = _f(3, "Attempts per job for transient failures.", min=1, max=100)
    retry_base_s: float = _f(30.0, "First retry delay; doubles each attempt (with jitter).", min=0, max=86400)
    retry_max_s: float = _f(3600.0, "Longest retry delay.", min=0, max=7 * 86400)
    shutdown_timeout_s: float = _f(
        20.0,
        "On stop, wait this long in all for running QC jobs and uploads before abandoning them to lease recovery (a second SIGTERM/Ctrl+C stops at once).",
        min=0,
        max=3600,
    )


#: Events a notification rule can take (daemon/notify.py).
NOTIFY_EVENTS = ("qc_fail", "qc_pass", "job_failed", "health", "digest", "early_warning")


@dataclass(frozen=True)
class NotifyRule:
    name: str = _f(
        "",
        "A short name for this rule, used in logs, status and the outbox.",
        required=True,
        pattern=r"^[A-Za-z0-9._-]+$",
    )
    urls: tuple[str, ...] = _f(
        (),
        "Where this rule's apprise URLs come from, never the URLs themselves (they hold tokens): 'env:NAME' (an "
        "environment variable of the service holding one or more URLs, separated by spaces or newlines) or 'file:PATH' "
        "(a file with one URL a line, '#' comments).",
        required=True,
        ref_path=True,
    )
    events: tuple[str, ...] = _f(
        ("qc_fail", "job_failed", "health", "early_warning"), "Events this rule sends.", choices=NOTIFY_EVENTS
    )
    quiet_hours: str = _f(
        "",
        "Daily window in the PC's local time, e.g. '22:00-07:00', during which events that are not urgent wait "
        "until it ends. Empty = none.",
    )
    urgent: tuple[str, ...] = _f(
        ("qc_fail", "early_warning"), "Events sent at once even in quiet hours.", choices=NOTIFY_EVENTS
    )


@dataclass(frozen=True)
class NotifyConfig:
    rule: tuple[NotifyRule, ...] = _f((), "Notification rules ([[notify.rule]] tables); none = no notifications.")
    timeout_s: float = _f(
        30.0,
        "Longest wait for one message to be accepted by its endpoint; longer counts as a failure and is retried. "
        "Sending never holds up QC or uploads.",
        min=1,
        max=600,
    )
    retry_base_s: float = _f(
        60.0, "First wait after a failed send to an endpoint; doubles with each failure.", min=1, max=86400
    )
    retry_max_s: float = _f(3600.0, "Longest wait between two sends to a failing endpoint.", min=1, max=7 * 86400)
    expire_after_s: float = _f(
        3 * 86400.0,
        "A message still not delivered this long after its event is given up (kept, shown as expired).",
        min=60,
        max=365 * 86400,
    )
    attach_pictures: bool = _f(
        True,
        "Attach the run's summary sheet (pictures/<chip>_summary.png: the verdict, every metric against its threshold, the reasons and small versions of the pictures) to qc_fail and qc_pass.",
    )
    disk_free_min_gb: float = _f(
        10.0,
        "health: warn when the free space of the state folder, the output folder or a watch root falls below "
        "this many GB (0 = never).",
        min=0,
        max=1e6,
    )
    health_grace_s: float = _f(
        300.0,
        "health: a problem (watch folder missing, watcher down, low disk) is sent once it has lasted this "
        "long, so short blips stay quiet; its end is sent too.",
        min=0,
        max=7 * 86400,
    )
    digest_at: str = _f(
        "",
        "Local time 'HH:MM' of the daily digest (the last 24 hours, for rules whose events include digest); "
        "empty = no digest.",
    )


@dataclass(frozen=True)
class LiveConfig:
    enabled: bool = _f(
        True,
        "Check a tile folder's FOVs while the microscope is still writing it (track lines, clarity, exposure, "
        "neighbour registration) and warn early (event early_warning) when the scan so far would fail QC.",
    )
    start_share: float = _f(
        0.15,
        "Judge the scan once this share of the grid is checked (when the folder's metadata gives the grid) ...",
        min=0.01,
        max=1,
    )
    start_rows: int = _f(2, "... or once this many full rows are, whichever comes first.", min=1, max=10000)
    tile_settle_s: float = _f(
        2.0,
        "A tile counts as written when its size and time stayed the same this long (and a TIFF is whole).",
        min=0.1,
        max=3600,
    )
    threads: int = _f(1, "Threads (cores) live QC may use for OpenCV and the clarity model.", min=1, max=64)
    priority: str = _f(
        "low",
        "Priority of the live QC thread (CPU and, on Linux, I/O), so the microscope software is never starved.",
        choices=("low", "below_normal", "normal"),
    )
    memory_mb: int = _f(
        512, "Decoded tiles kept for their neighbours' registration, at most this many MiB.", min=16, max=1 << 20
    )
    poll_s: float = _f(1.0, "How often a growing tile folder is looked at, seconds.", min=0.1, max=600)


@dataclass(frozen=True)
class WebConfig:
    listen: str = _f(
        "",
        "Address 'host:port' of the read-only status page and Prometheus /metrics (daemon/web.py), e.g. "
        "'127.0.0.1:8787'; empty = off. Any address other than loopback (127.x, ::1, localhost) needs a token.",
    )
    token: str = _f(
        "",
        "Where the page's access token comes from, never the token itself: 'env:NAME' (an environment variable of "
        "the service) or 'file:PATH' (a file holding it). Browsers give it as the password of the login prompt, "
        "Prometheus as a bearer token. Required when listen is not a loopback address.",
        ref_path=True,
    )
    refresh_s: int = _f(15, "The status page reloads itself this often, seconds.", min=2, max=3600)


@dataclass(frozen=True)
class FleetConfig:
    interval_s: float = _f(
        300.0,
        "How often the service writes its status document (imageqc.fleet/1) to each upload target, at "
        "{prefix}/_fleet/{site}/{host}.json, with the target's own credentials; `imageqc fleet` lists every PC's. "
        "0 = never. A PC silent for 3 intervals is shown as stale.",
        min=0,
        max=86400,
    )
    host: str = _f(
        "", "This PC's name in its fleet document; empty = the computer's name.", pattern=r"^[A-Za-z0-9._-]*$"
    )


@dataclass(frozen=True)
class Config:
    state_dir: Path = _f(Path(".imageqc"), "Folder for the job database, logs, checkpoints and (by default) outputs.")
    site: SiteConfig = _sub(SiteConfig, "The site this PC belongs to.")
    watch: tuple[WatchRoot, ...] = _f((WatchRoot(),), "Watch roots ([[watch]] tables).")
    discovery: DiscoveryConfig = _sub(DiscoveryConfig, "How scan sets are found and judged complete.")
    qc: QCConfig = _sub(QCConfig, "QC settings.")
    output: OutputConfig = _sub(OutputConfig, "QC outputs.")
    upload: tuple[UploadTarget, ...] = _f((), "Upload targets ([[upload]] tables); none = no upload.")
    logging: LoggingConfig = _sub(LoggingConfig, "Logging.")
    service: ServiceConfig = _sub(ServiceConfig, "The service loop.")
    notify: NotifyConfig = _sub(NotifyConfig, "Notifications (apprise): QC failures, failed jobs, health.")
    web: WebConfig = _sub(WebConfig, "The read-only status page and Prometheus metrics, on one local listener.")
    fleet: FleetConfig = _sub(FleetConfig, "This PC's status document in each upload target, for the facility's view.")
    live: LiveConfig = _sub(LiveConfig, "Live QC of tile folders while the microscope is still writing them.")
    source: str = field(default="<embedded default>", metadata={"internal": True})

    # Derived paths -----------------------------------------------------
    @property
    def database_path(self) -> Path:
        return self.state_dir / "imageqc.sqlite3"

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir) if self.output.dir else self.state_dir / "outputs"

    @property
    def log_file(self) -> Path:
        return Path(self.logging.file) if self.logging.file else self.state_dir / "logs" / "imageqc.jsonl"


DEFAULT_TOML = """\
# imageqc embedded default: watch ./inbox, state in ./.imageqc/, no upload.
state_dir = ".imageqc"

[[watch]]
path = "inbox"

# No [[notify.rule]]: notifications are off.
"""

_SECRET_WORDS = ("secret", "password", "passwd", "token", "access_key", "accesskey", "private_key")


# ---------------------------------------------------------------------------
# Value parsers shared with the upload policy
# ---------------------------------------------------------------------------

_BW_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "bit": 1 / 8,
    "kbit": 1000 / 8,
    "mbit": 1000**2 / 8,
    "gbit": 1000**3 / 8,
}


def parse_bandwidth(text: str) -> int:
    """``'20MB/s'`` -> bytes per second (0 = unlimited). Raises ``ValueError``."""
    text = text.strip()
    if not text:
        return 0
    m = re.fullmatch(r"(?i)\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*(?:/\s*s)?\s*", text)
    if not m:
        msg = f"cannot read {text!r} as a rate; write e.g. '20MB/s', '512KiB/s' or '100Mbit/s'"
        raise ValueError(msg)
    unit = (m.group(2) or "b").lower()
    if unit not in _BW_UNITS:
        msg = f"unknown unit {m.group(2)!r} in {text!r}; use one of B, KB, MB, GB, KiB, MiB, GiB, bit, Kbit, Mbit, Gbit"
        raise ValueError(msg)
    return int(float(m.group(1)) * _BW_UNITS[unit])


def parse_window(text: str) -> tuple[int, int] | None:
    """``'20:00-06:00'`` -> (start, end) in minutes after midnight; '' -> None."""
    text = text.strip()
    if not text:
        return None
    m = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)\s*-\s*([01]?\d|2[0-4]):([0-5]\d)", text)
    if not m:
        msg = f"cannot read {text!r} as a daily window; write HH:MM-HH:MM, e.g. '20:00-06:00'"
        raise ValueError(msg)
    start = int(m.group(1)) * 60 + int(m.group(2))
    end = int(m.group(3)) * 60 + int(m.group(4))
    if end > 24 * 60:
        msg = f"{text!r}: the window must end by 24:00"
        raise ValueError(msg)
    if start == end:
        msg = f"{text!r}: start and end are equal; leave the window empty to allow any time"
        raise ValueError(msg)
    return start, end


def parse_clock(text: str) -> int:
    """``'08:00'`` -> minutes after midnight. Raises ``ValueError``."""
    m = re.fullmatch(r"\s*([01]?\d|2[0-3]):([0-5]\d)\s*", text)
    if not m:
        msg = f"cannot read {text!r} as a time of day; write HH:MM, e.g. '08:00'"
        raise ValueError(msg)
    return int(m.group(1)) * 60 + int(m.group(2))


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


class _Locator:
    """Finds the line of a key path in TOML text (best effort, for messages)."""

    _header = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\]?\s*(#.*)?$")
    _key = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")

    def __init__(self, text: str | None) -> None:
        self.lines: dict[str, int] = {}
        if not text:
            return
        table = ""
        counts: dict[str, int] = {}
        for no, raw in enumerate(text.splitlines(), start=1):
            hm = self._header.match(raw)
            if hm:
                name = hm.group(2).replace('"', "").replace(" ", "")
                if hm.group(1) == "[[":
                    idx = counts.get(name, 0)
                    counts[name] = idx + 1
                    table = f"{name}[{idx}]"
                else:
                    # a sub-table of the last array element: [watch.x] after [[watch]]
                    head = name.split(".")[0]
                    table = name if head not in counts else f"{head}[{counts[head] - 1}]{name[len(head) :]}"
                self.lines.setdefault(table, no)
                continue
            km = self._key.match(raw)
            if km:
                key = km.group(1).strip('"')
                path = f"{table}.{key}" if table else key
                self.lines.setdefault(path, no)

    def line(self, keypath: str) -> int | None:
        probe = keypath
        while probe:
            if probe in self.lines:
                return self.lines[probe]
            cut = max(probe.rfind("."), probe.rfind("["))
            probe = probe[:cut] if cut > 0 else ""
        return None


class _Reported(Exception):
    """A part of the file could not be built; its errors are already in ``_Loader.errors``."""


def _is_table(tp: Any) -> TypeGuard[type]:
    """Whether a field's type hint is a settings table (a dataclass), not a value."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


class _Loader:
    """Builds the config dataclasses from TOML data, collecting every error of the file.

    A wrong setting is recorded and its default kept, so the rest of the file is
    still checked and ``config check`` reports every mistake at once.
    """

    def __init__(self, file: str, text: str | None, base: Path) -> None:
        self.file = file
        self.loc = _Locator(text)
        self.base = base
        self.errors: list[ConfigError] = []

    def error(self, keypath: str, problem: str) -> ConfigError:
        return ConfigError(problem, file=self.file, key=keypath, line=self.loc.line(keypath))

    def report(self, err: ConfigError) -> None:
        """Record an error, unless one is already recorded for the same setting, a part of it or a whole it is part of.

        (A setting that failed keeps its default; a check of the whole that
        holds it would only repeat the first error in other words.)
        """
        for seen in self.errors:
            a, b = err.key, seen.key
            if a == b or a.startswith((b + ".", b + "[")) or b.startswith((a + ".", a + "[")):
                return
        self.errors.append(err)

    def check(self, keypath: str, problem: str) -> None:
        """A cross-setting problem: recorded like the others (see :meth:`report`)."""
        self.report(self.error(keypath, problem))

    def build(self, cls: type, data: Any, keypath: str) -> Any:
        if not isinstance(data, dict):
            raise self.error(keypath, f"must be a table, got {_tname(data)}")
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        hints = typing.get_type_hints(cls)
        failed = False
        unknown = [key for key in data if key not in fields]
        for key in unknown:
            self.report(self.error(_join(keypath, key), self._unknown(key, list(fields), keypath)))
        values: dict[str, Any] = {}
        for name, f in fields.items():
            kp = _join(keypath, name)
            if name not in data:
                if f.metadata.get("required"):
                    failed = True
                    if not difflib.get_close_matches(name, unknown, n=1, cutoff=0.6):  # else "did you mean" said it
                        self.report(
                            self.error(kp if keypath else name, f"missing required setting ({f.metadata['help']})")
                        )
                continue
            try:
                values[name] = self.convert(hints[name], data[name], kp, f.metadata)
            except ConfigError as e:
                self.report(e)
                failed = failed or bool(f.metadata.get("required"))
            except _Reported:
                failed = failed or bool(f.metadata.get("required"))
        if failed:  # cannot be built without its required settings: the errors say why
            raise _Reported
        return cls(**values)

    def _unknown(self, key: str, known: list[str], keypath: str = "") -> str:
        if any(w in key.lower() for w in _SECRET_WORDS) and keypath.startswith("notify"):
            return (
                "secrets do not belong in the config file; put the apprise URL in the service's environment or "
                "a file and name it in 'urls' ('env:NAME' or 'file:PATH')"
            )
        if any(w in key.lower() for w in _SECRET_WORDS):
            return (
                "secrets do not belong in the config file; point 'credentials' at an environment "
                "variable prefix ('env:PREFIX'), a credentials file ('file:PATH') or a profile ('profile:NAME')"
            )
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known settings here: {', '.join(sorted(known))}"
        return f"unknown setting{hint}"

    def convert(self, tp: Any, value: Any, kp: str, meta: Mapping[str, Any]) -> Any:
        origin = typing.get_origin(tp)
        if _is_table(tp):
            return self.build(tp, value, kp)
        if origin is tuple:
            (item_tp, _ellipsis) = typing.get_args(tp)
            if not isinstance(value, list):
                raise self.error(kp, f"must be a list, got {_tname(value)}")
            items = meta.get("items")
            if items and not items[0] <= len(value) <= items[1]:
                want = f"{items[0]}" if items[0] == items[1] else f"{items[0]} to {items[1]}"
                raise self.error(kp, f"must be a list of {want} values, got {len(value)}")
            items_out, bad = [], False
            for i, v in enumerate(value):  # every item is checked, so every item's mistakes are reported
                try:
                    items_out.append(self.convert(item_tp, v, f"{kp}[{i}]", meta))
                except ConfigError as e:
                    self.report(e)
                    bad = True
                except _Reported:
                    bad = True
            if bad:  # keep the default list: indices of the others would not match the file
                raise _Reported
            return tuple(items_out)
        if origin is dict:
            if not isinstance(value, dict):
                raise self.error(kp, f"must be a table of strings, got {_tname(value)}")
            for k, v in value.items():
                if not isinstance(v, str):
                    raise self.error(f"{kp}.{k}", f"must be a string, got {_tname(v)}")
            return dict(value)
        if tp is bool:
            if not isinstance(value, bool):
                raise self.error(kp, f"must be true or false, got {_tname(value)} {value!r}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.error(kp, f"must be a whole number, got {_tname(value)} {value!r}")
            self._range(value, kp, meta)
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.error(kp, f"must be a number, got {_tname(value)} {value!r}")
            self._range(value, kp, meta)
            return float(value)
        if tp is str or tp is Path:
            if not isinstance(value, str):
                raise self.error(kp, f"must be a string, got {_tname(value)} {value!r}")
            self._string(value, kp, meta)
            if tp is Path:
                if not value.strip():
                    raise self.error(kp, "must not be empty")
                p = Path(value).expanduser()
                return p if p.is_absolute() or is_unc(value) else self.base / p
            if meta.get("path") and value.strip() and not is_unc(value):
                p = Path(value).expanduser()  # a path kept as text ('' = a default)
                return str(p if p.is_absolute() else self.base / p)
            if meta.get("ref_path") and value.startswith("file:") and value[5:].strip() and not is_unc(value[5:]):
                p = Path(value[5:].strip()).expanduser()  # 'file:PATH' reference
                return "file:" + str(p if p.is_absolute() else self.base / p)
            return value
        raise TypeError(f"unsupported config type {tp!r} at {kp}")  # programming error

    def _range(self, value: float, kp: str, meta: Mapping[str, Any]) -> None:
        lo, hi = meta.get("min"), meta.get("max")
        if meta.get("zero_is_auto") and value == 0:
            return
        if lo is not None and value < lo:
            raise self.error(kp, f"must be >= {lo} (got {value})")
        if hi is not None and value > hi:
            raise self.error(kp, f"must be <= {hi} (got {value})")

    def _string(self, value: str, kp: str, meta: Mapping[str, Any]) -> None:
        choices = meta.get("choices")
        if choices and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise self.error(kp, f"must be one of {', '.join(choices)} (got {value!r}){hint}")
        pattern = meta.get("pattern")
        if pattern and value and not re.match(pattern, value):
            raise self.error(kp, f"{value!r} has characters that are not allowed (letters, digits, '.', '_', '-')")
        problem = tile_pattern_problem(value) if meta.get("regex") and value else None
        if problem:
            raise self.error(kp, problem)


def tile_pattern_problem(value: str) -> str | None:
    """What is wrong with a tile-name regex (it must compile and name groups row and col, or index), or None."""
    try:
        compiled = re.compile(value)
    except re.error as e:
        return f"not a valid regular expression: {e}"
    groups = set(compiled.groupindex)
    if not ({"row", "col"} <= groups or "index" in groups):
        return "the regex needs named groups (?P<row>...) and (?P<col>...), or (?P<index>...) for row-major numbering"
    return None


def _join(keypath: str, key: str) -> str:
    return f"{keypath}.{key}" if keypath else key


def _tname(v: Any) -> str:
    return {
        bool: "a boolean",
        int: "a whole number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(v), type(v).__name__)


def _cross_checks(cfg: Config, ld: _Loader) -> None:
    names: set[str] = set()
    for i, t in enumerate(cfg.upload):
        kp = f"upload[{i}]"
        if t.name in names:
            ld.check(f"{kp}.name", f"two upload targets are named {t.name!r}; names must be unique")
        names.add(t.name)
        if t.type in ("s3", "oss") and not t.bucket:
            ld.check(f"{kp}.bucket", f"missing required setting for a {t.type} target (the bucket name)")
        if t.type == "oss" and not t.endpoint:
            ld.check(
                f"{kp}.endpoint",
                "missing required setting for an oss target, e.g. 'https://oss-cn-hangzhou.aliyuncs.com'",
            )
        if t.type == "hpc" and not t.path:
            ld.check(f"{kp}.path", "missing required setting for an hpc target (a mounted folder or UNC share)")
        if t.endpoint and not re.match(r"^https?://[^/\s]+", t.endpoint):
            ld.check(f"{kp}.endpoint", f"{_mask_url(t.endpoint)!r} is not a URL; write e.g. 'https://s3.example.org'")
        for attr, parser in (("window", parse_window), ("bandwidth_limit", parse_bandwidth)):
            try:
                parser(getattr(t, attr))
            except ValueError as e:
                ld.check(f"{kp}.{attr}", str(e))
        cred = t.credentials
        if cred and not re.match(r"^(env:[A-Za-z_][A-Za-z0-9_]*|env|file:.+|profile:.+)$", cred):
            ld.check(
                f"{kp}.credentials",
                "must be '', 'env', 'env:PREFIX', 'file:PATH' or 'profile:NAME' (a reference, never the secret)",
            )
        try:
            _check_template(t.key_template)
        except ValueError as e:
            ld.check(f"{kp}.key_template", str(e))
    _notify_checks(cfg, ld)
    _web_checks(cfg, ld)
    if 0 < cfg.fleet.interval_s < 10:
        ld.check(
            "fleet.interval_s", f"{cfg.fleet.interval_s:g} s is too often for a bucket; use 0 (never) or at least 10"
        )
    if not cfg.watch:
        ld.check("watch", "at least one [[watch]] root is needed")
    if cfg.qc.model:
        model = Path(cfg.qc.model)
        if not model.is_file():
            ld.check("qc.model", f"no file at {model}; give the path of the .json sidecar or the .onnx model")
        if model.suffix.lower() == ".onnx" and not cfg.qc.model_preset and not cfg.qc.model_classes:
            ld.check("qc.model", "an .onnx model needs model_preset or model_classes (or use its .json sidecar)")
    elif cfg.qc.model_preset or cfg.qc.model_classes:
        ld.check("qc.model_preset" if cfg.qc.model_preset else "qc.model_classes", "only used with qc.model")
    cats = {"good", "mild_blur", "severe_blur", "mild_overexposure", "severe_overexposure", "background"}
    for k, v in cfg.qc.model_classes.items():
        if v not in cats:
            ld.check(f"qc.model_classes.{k}", f"{v!r} is not a category; use one of {', '.join(sorted(cats))}")
    roots = [w.path.resolve() for w in cfg.watch]
    out = cfg.output_dir.resolve()
    for i, r in enumerate(roots):
        if out == r or r in out.parents:
            ld.check(
                "output.dir",
                f"the output folder {out} lies inside watch root {cfg.watch[i].path}; "
                "choose an output folder outside the watched folders",
            )


_URL_REF = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+)$")


def _notify_checks(cfg: Config, ld: _Loader) -> None:
    """[notify]: unique rule names, URL references (never URLs), quiet hours, digest time."""
    n = cfg.notify
    if n.digest_at:
        try:
            parse_clock(n.digest_at)
        except ValueError as e:
            ld.check("notify.digest_at", str(e))
    names: set[str] = set()
    for i, r in enumerate(n.rule):
        kp = f"notify.rule[{i}]"
        if r.name in names:
            ld.check(f"{kp}.name", f"two notification rules are named {r.name!r}; names must be unique")
        names.add(r.name)
        if not r.urls:
            ld.check(
                f"{kp}.urls", "missing required setting: at least one 'env:NAME' or 'file:PATH' holding apprise URLs"
            )
        for j, ref in enumerate(r.urls):
            if not _URL_REF.match(ref.strip()):
                ld.check(
                    f"{kp}.urls[{j}]",
                    "must be 'env:NAME' or 'file:PATH', a reference, never the URL itself (apprise URLs hold tokens): "
                    "put the URL in the service's environment or in a file only the service can read",
                )
        try:
            parse_window(r.quiet_hours)
        except ValueError as e:
            ld.check(f"{kp}.quiet_hours", str(e))
        if not r.events:
            ld.check(f"{kp}.events", f"empty: name at least one of {', '.join(NOTIFY_EVENTS)}")
        if "digest" in r.events and not n.digest_at:
            ld.check(f"{kp}.events", "'digest' needs notify.digest_at, the local time to send it (e.g. '08:00')")


def parse_listen(text: str) -> tuple[str, int]:
    """``'127.0.0.1:8787'`` or ``'[::1]:8787'`` -> (host, port). Raises ``ValueError``."""
    m = re.fullmatch(r"\s*(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.\-]*)):([0-9]{1,5})\s*", text)
    if not m or not 0 < int(m.group(3)) < 65536:
        msg = f"cannot read {text!r} as an address; write 'host:port', e.g. '127.0.0.1:8787' (IPv6: '[::1]:8787')"
        raise ValueError(msg)
    return (m.group(1) if m.group(1) is not None else m.group(2)), int(m.group(3))


def is_loopback(host: str) -> bool:
    """Whether ``host`` only ever reaches this machine (127.x, ::1, localhost)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _web_checks(cfg: Config, ld: _Loader) -> None:
    """[web]: a readable address; a token reference, and one whenever the page is reachable from other machines."""
    w = cfg.web
    if w.token and not _URL_REF.match(w.token.strip()):
        ld.check("web.token", "must be 'env:NAME' or 'file:PATH', a reference, never the token itself")
    if not w.listen:
        return
    try:
        host, _port = parse_listen(w.listen)
    except ValueError as e:
        ld.check("web.listen", str(e))
        return
    if not is_loopback(host) and not w.token:
        ld.check(
            "web.listen",
            f"{w.listen!r} can be reached from other machines, so it needs web.token ('env:NAME' or 'file:PATH' "
            "holding a long random token); or listen on '127.0.0.1:PORT'",
        )


_TEMPLATE_FIELDS = {"prefix", "site", "chip", "run", "name", "kind", "date"}


def _check_template(tpl: str) -> None:
    import string

    used = {f for _, f, _, _ in string.Formatter().parse(tpl) if f is not None}
    unknown = used - _TEMPLATE_FIELDS
    if unknown:
        msg = f"unknown field(s) {', '.join(sorted(unknown))}; use {', '.join(sorted(_TEMPLATE_FIELDS))}"
        raise ValueError(msg)
    if "name" not in used:
        msg = "must contain {name}, or every file of a run would go to the same key"
        raise ValueError(msg)


def load_config_text(text: str, *, file: str = "<embedded default>", base: Path | None = None) -> Config:
    """Parse and validate TOML text. Relative paths resolve against ``base``."""
    base = Path.cwd() if base is None else base
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        line = int(m.group(1)) if m else (text.count("\n") + 1 if "end of document" in str(e) else None)
        raise ConfigError(f"not valid TOML: {e}", file=file, line=line) from None
    ld = _Loader(file, text, base)
    cfg: Config | None
    try:
        cfg = ld.build(Config, data, "")
    except _Reported:
        cfg = None
    if cfg is not None:
        cfg = dataclasses.replace(cfg, source=file)
        _cross_checks(cfg, ld)
    if ld.errors:
        raise ld.errors[0] if len(ld.errors) == 1 else ConfigErrors(sorted(ld.errors, key=lambda e: e.line or 0))
    assert cfg is not None
    return cfg


def load_config(path: str | Path | None = None) -> Config:
    """Load a config file, or the embedded default when ``path`` is None."""
    if path is None:
        return load_config_text(DEFAULT_TOML)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found; check the path, or run without --config for the default", file=p) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the file: {e}", file=p) from None
    return load_config_text(text, file=str(p), base=p.resolve().parent)


def default_config() -> Config:
    return load_config(None)


# ---------------------------------------------------------------------------
# Introspection and display
# ---------------------------------------------------------------------------


def iter_fields(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field[Any]]]:
    """Yield ``(key path, field)`` for every leaf setting (arrays of tables as ``name[]``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = hints[f.name]
        kp = _join(prefix, f.name)
        if _is_table(tp):
            yield from iter_fields(tp, kp)
        elif typing.get_origin(tp) is tuple and _is_table(typing.get_args(tp)[0]):
            yield from iter_fields(typing.get_args(tp)[0], kp + "[]")
        else:
            yield kp, f


def _mask_url(url: str) -> str:
    return re.sub(r"(://)([^/@\s]+)@", r"\1***@", url)


def config_to_dict(cfg: Any, *, mask: bool = True) -> Any:
    """The effective config as plain data (for printing), secrets masked."""
    if dataclasses.is_dataclass(cfg):
        out = {}
        for f in dataclasses.fields(cfg):
            v = config_to_dict(getattr(cfg, f.name), mask=mask)
            if mask and isinstance(v, str) and any(w in f.name.lower() for w in _SECRET_WORDS):
                v = "***" if v else v
            out[f.name] = v
        return out
    if isinstance(cfg, tuple):
        return [config_to_dict(v, mask=mask) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v, mask=mask) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    if isinstance(cfg, str) and mask:
        return _mask_url(cfg)
    return cfg


# ---------------------------------------------------------------------------
# The commented example (config.example.toml is this function's output)
# ---------------------------------------------------------------------------

_EXAMPLE_HEAD = """\
# imageqc configuration: every setting, with its default and what it does.
#
# Use it with `imageqc run --config FILE` (or set IMAGEQC_CONFIG=FILE);
# check it with `imageqc config check FILE`. Without a file imageqc uses its
# embedded default: watch ./inbox, state in ./.imageqc/, no upload.
# Relative paths are relative to this file's folder.
# This file is generated by `imageqc config example`; the defaults below are
# the ones the code uses.
"""

_EXAMPLE_UPLOADS = """\
# Upload targets: one [[upload]] table each; none = no upload (jobs end
# 'skipped' after QC). Credentials are never written here: 'credentials'
# names where they come from. Examples for the three types follow the full
# commented list of settings.
"""

_EXAMPLE_TARGETS = """\
# An S3-compatible store (e.g. MinIO or Ceph) on the site network:
# [[upload]]
# name = "lab-minio"
# type = "s3"
# endpoint = "https://minio.lab.example:9000"
# bucket = "stereo-qc"
# addressing_style = "path"
# credentials = "env:LAB_MINIO"
#
# Aliyun OSS:
# [[upload]]
# name = "aliyun"
# type = "oss"
# endpoint = "https://oss-cn-shenzhen.aliyuncs.com"
# region = "cn-shenzhen"
# bucket = "stereo-raw"
# mode = "all"
# window = "20:00-06:00"
# credentials = "file:C:/ProgramData/imageqc/oss.ini"
#
# The HPC share:
# [[upload]]
# name = "hpc"
# type = "hpc"
# path = "//hpc-nas/stereo/incoming"
# mode = "inputs"
"""


_EXAMPLE_NOTIFY = """\
# Notification rules: one [[notify.rule]] table each; none = no notifications.
# A rule sends its events (qc_fail, qc_pass, job_failed, health, digest,
# early_warning: live QC of a scan still running) to apprise URLs
# (https://github.com/caronc/apprise/wiki: mail, chat webhooks, ...). The
# URLs hold tokens, so 'urls' names where they come from: 'env:NAME' or
# 'file:PATH'. Check a rule with `imageqc notify test`.
"""

_EXAMPLE_RULES = """\
# The lab's chat (a webhook URL in the service's environment), quiet at night
# except for QC failures:
# [[notify.rule]]
# name = "lab-chat"
# urls = ["env:IMAGEQC_NOTIFY_URL"]
# events = ["qc_fail", "job_failed", "health"]
# quiet_hours = "22:00-07:00"
#
# The core facility's mail (a file holding e.g.
# mailtos://user:password@smtp.example.org?to=core@example.org), with the
# daily digest (set digest_at in [notify]):
# [[notify.rule]]
# name = "facility-mail"
# urls = ["file:/etc/imageqc/notify-mail.url"]
# events = ["job_failed", "health", "digest"]
"""


def _toml_literal(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return json.dumps(value.as_posix())
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else "{ " + ", ".join(f"{k} = {_toml_literal(v)}" for k, v in value.items()) + " }"
    if isinstance(value, float) and value.is_integer():
        return f"{value:.1f}"
    if isinstance(value, int) and abs(value) >= 100_000:
        return f"{value:_}"
    return json.dumps(value)


def _example_fields(cls: type, prefix: str, commented: bool, instance: Any = None) -> list[str]:
    out: list[str] = []
    hints = typing.get_type_hints(cls)
    sub_tables: list[tuple[str, type]] = []
    c = "# " if commented else ""
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = hints[f.name]
        if _is_table(tp):
            sub_tables.append((f.name, tp))
            continue
        if typing.get_origin(tp) is tuple and _is_table(typing.get_args(tp)[0]):
            continue  # arrays of tables are written separately
        default = (
            getattr(instance, f.name)
            if instance is not None
            else (f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
        )
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            many = typing.get_origin(tp) is tuple
            help_text += f" {'Any' if many else 'One'} of: {', '.join(f.metadata['choices'])}."
        if f.metadata.get("required"):
            help_text += " Required."
        for line in _wrap(help_text):
            out.append(f"# {line}")
        out.append(f"{c}{f.name} = {_toml_literal(default)}")
        out.append("")
    for name, tp in sub_tables:
        header = f"[{prefix}{name}]"
        out.append(f"{c}{header}")
        out.extend(_example_fields(tp, f"{prefix}{name}.", commented))
    return out


def _wrap(text: str, width: int = 76) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def example_toml() -> str:
    """The commented example configuration, every setting with its default."""
    parts = [_EXAMPLE_HEAD, ""]
    top = Config()
    for f in dataclasses.fields(Config):
        if f.name == "state_dir":
            parts += [f"# {line}" for line in _wrap(f.metadata["help"])]
            parts += [f"state_dir = {_toml_literal(top.state_dir)}", ""]
    parts += ["# Watch roots: one [[watch]] table per export folder.", "[[watch]]"]
    parts += _example_fields(WatchRoot, "watch.", False)
    for name, cls in (
        ("site", SiteConfig),
        ("discovery", DiscoveryConfig),
        ("qc", QCConfig),
        ("output", OutputConfig),
        ("logging", LoggingConfig),
        ("service", ServiceConfig),
        ("notify", NotifyConfig),
        ("web", WebConfig),
        ("fleet", FleetConfig),
        ("live", LiveConfig),
    ):
        parts += [f"[{name}]"]
        # The example turns the local page on; the embedded default leaves it off.
        example = WebConfig(listen="127.0.0.1:8787") if cls is WebConfig else None
        parts += _example_fields(cls, f"{name}.", False, example)
    parts += [_EXAMPLE_NOTIFY, "# [[notify.rule]]"]
    parts += _example_fields(NotifyRule, "notify.rule.", True)
    parts += [_EXAMPLE_RULES]
    parts += [_EXAMPLE_UPLOADS, "# [[upload]]"]
    parts += _example_fields(UploadTarget, "upload.", True)
    parts += [_EXAMPLE_TARGETS]
    return "\n".join(parts).rstrip() + "\n"
