"""The local listener (daemon/web.py): /metrics over real HTTP, the status page in a real browser, its security.

Issue #19, parts 1 and 2. The server runs on 127.0.0.1 on a free port; requests go through urllib or http.client
(raw paths, so `..` reaches the server as typed); /metrics is parsed with prometheus_client's own parser; the page
is loaded by Debian's chromium in headless mode (skipped, saying why, where chromium is not installed).
"""

from __future__ import annotations

import base64
import html
import http.client
import os
import re
import shutil
import socket
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from daemon.config import load_config_text
from daemon.errors import ConfigError
from daemon.service import Daemon
from daemon.store import JobState, Store
from daemon.web import SAFE_HEADERS, WebServer
from daemon.worker import JobContext, JobOutcome
from tests.helpers import run_child, scaled, wait_job, wait_until

REPO = Path(__file__).resolve().parents[2]
CHIP = "SS200000135TL_D1"
#: The picture's colour: pure magenta, found in the browser's screenshot only if the picture was shown.
PICTURE_RGB = (255, 0, 255)
REASON = "track line score 42 < 60: few track crossings found"
#: How the reason reads in HTML (and in the browser's serialised DOM).
REASON_HTML = html.escape(REASON, quote=False)
REPORT = {
    "schema": "imageqc.report/1",
    "chip": CHIP,
    "stain": "DAPI",
    "verdict": "fail",
    "reasons": [REASON, "<script>alert('x')</script> & more"],
    "checks": [
        {
            "metric": "track",
            "image": CHIP,
            "value": 42.0,
            "threshold": ">= 60",
            "passed": False,
            "required": True,
            "reason": REASON,
            "detail": None,
        },
        {
            "metric": "clarity",
            "image": CHIP,
            "value": 91.5,
            "threshold": ">= 80",
            "passed": True,
            "required": False,
            "reason": None,
            "detail": None,
        },
    ],
    "stage_s": {"read": 0.4, "track": 3.2, "clarity": 1.1, "verdict": 0.01},
    "duration_s": 4.7,
}


def write_png(path: Path, rgb: tuple[int, int, int] = PICTURE_RGB, size: tuple[int, int] = (160, 120)) -> Path:
    """A real PNG of one colour (no imaging library needed)."""
    w, h = size
    raw = b"".join(b"\x00" + bytes(rgb) * w for _ in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return path


def qc_with_pictures(ctx: JobContext) -> JobOutcome:
    """A job function (run by the real worker in a child process): a failing report and a picture in its output folder."""
    folder = ctx.config.output_dir / f"{ctx.job.chip}_run"
    write_png(folder / "pictures" / "track.png")
    with ctx.open_store() as store:
        store.save_result(ctx.job.id, verdict="fail", report=REPORT, output_dir=str(folder), owner=ctx.owner)
    return JobOutcome(state="qc_done", message=f"QC fail: {REASON}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def web_config(make_config, listen: str | None = None, extra: str = ""):
    return make_config(f'[web]\nlisten = "{listen or f"127.0.0.1:{free_port()}"}"\nrefresh_s = 5\n{extra}')


def add_job(
    cfg,
    *,
    chip: str = CHIP,
    verdict: str | None = "fail",
    report: dict | None = None,
    output_dir: Path | None = None,
    fp: str = "fp",
) -> int:
    """A job as the service leaves it: QC done (with a result) then skipped; or queued when verdict is None."""
    with Store(cfg.database_path) as s:
        ssid, _ = s.add_scan_set(
            chip=chip,
            root=str(cfg.watch[0].path),
            fingerprint=fp,
            members=[{"name": chip, "path": f"{cfg.watch[0].path}/{chip}.tif", "size": 1}],
        )
        job_id = s.create_job(ssid)
        if verdict is None:
            return job_id
        job = s.claim("t")
        assert job is not None and job.id == job_id
        s.save_result(
            job_id,
            verdict=verdict,
            report=report or {**REPORT, "verdict": verdict},
            output_dir=str(output_dir) if output_dir else None,
        )
        s.transition(job_id, JobState.QC_DONE, owner="t")
        s.transition(job_id, JobState.SKIPPED)
    return job_id


@pytest.fixture
def served(make_config):
    """A state folder with one failed-QC job and its picture, and the listener serving it."""
    cfg = web_config(make_config)
    folder = cfg.output_dir / f"{CHIP}_run"
    write_png(folder / "pictures" / "track.png")
    job_id = add_job(cfg, output_dir=folder)
    web = WebServer(cfg)
    web.start()
    assert web.error is None, web.error
    yield cfg, web, job_id
    web.stop()


def get(url: str, *, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=scaled(30)) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def raw_get(web: WebServer, path: str) -> int:
    """GET a path exactly as written (no client-side normalisation of `..` or escapes)."""
    host, port = web.address
    conn = http.client.HTTPConnection(host, port, timeout=scaled(30))
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def metrics(url: str, **kw) -> dict[str, dict[tuple, float]]:
    """/metrics parsed by prometheus_client's parser: {sample name: {sorted label items: value}}."""
    status, headers, body = get(url + "/metrics", **kw)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


# -- /metrics ------------------------------------------------------------------------------------


def test_metrics_over_http_parse_with_prometheus_parser(served):
    cfg, web, _job_id = served
    m = metrics(web.url)
    assert m["imageqc_jobs"][(("state", "skipped"),)] == 1
    assert m["imageqc_jobs"][(("state", "queued"),)] == 0
    assert m["imageqc_build_info"][(("version", __import__("daemon").__version__),)] == 1
    assert m["imageqc_database_readable"][()] == 1
    assert m["imageqc_disk_free_bytes"][(("path", str(cfg.state_dir)), ("role", "state"))] > 0
    assert m["imageqc_notify_outbox_messages"][(("state", "waiting"),)] == 0
    # the newest result's scores, known before the listener started
    assert m["imageqc_qc_last_score"][(("image", CHIP), ("metric", "track"))] == 42.0
    assert m["imageqc_qc_last_passed"][(("chip", CHIP),)] == 0
    # counters count runs finished while listening: none yet, then one more
    assert m["imageqc_qc_runs_total"][(("verdict", "fail"),)] == 0
    add_job(cfg, chip="C02533C", verdict="pass", fp="fp2")
    m = metrics(web.url)
    assert m["imageqc_qc_runs_total"][(("verdict", "pass"),)] == 1
    assert m["imageqc_qc_checks_total"][(("metric", "track"), ("outcome", "fail"))] == 1
    assert m["imageqc_qc_checks_total"][(("metric", "clarity"), ("outcome", "pass"))] == 1
    assert m["imageqc_qc_stage_duration_seconds_count"][(("stage", "track"),)] == 1
    assert m["imageqc_qc_stage_duration_seconds_bucket"][(("le", "5.0"), ("stage", "track"))] == 1
    assert m["imageqc_qc_stage_duration_seconds_bucket"][(("le", "2.5"), ("stage", "track"))] == 0
    assert m["imageqc_qc_stage_duration_seconds_sum"][(("stage", "track"),)] == pytest.approx(3.2)
    assert m["imageqc_qc_duration_seconds_count"][()] == 1
    assert m["imageqc_qc_last_passed"][(("chip", "C02533C"),)] == 1
    m = metrics(web.url)  # a second scrape counts nothing twice
    assert m["imageqc_qc_runs_total"][(("verdict", "pass"),)] == 1


def test_metrics_from_the_heartbeat_and_from_the_store_when_the_service_is_stopped(make_config):
    cfg = web_config(make_config, extra='[[upload]]\nname = "lab-s3"\ntype = "s3"\nbucket = "stereo-qc"\n')
    add_job(cfg)
    now = time.time()
    root = str(cfg.watch[0].path)
    beat = {
        "state": "running",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "version": "0.1.0",
        "started_at": now - 60,
        "components": {
            "discovery": {
                "roots": [
                    {
                        "path": root,
                        "observer": "polling",
                        "health": "restarted 1x",
                        "last_rescan": now - 30,
                        "pending": 2,
                    },
                    {"path": "/gone", "observer": "native", "health": "observer down"},
                ],
                "waiting": {
                    "sets": [
                        {
                            "chip": "C02533C",
                            "since": now - 120,
                            "stage": "settling",
                            "reason": "IF image without its <nuclear> image",
                            "folder": root,
                        }
                    ],
                    "sets_total": 3,
                    "misnamed": [{"path": f"{root}/notes.tif", "reason": "not a chip serial"}],
                    "misnamed_total": 1,
                },
            },
            "uploads": {
                "targets": {
                    "lab-s3": {"files": 3, "bytes": 3_000, "rate_bps": 1_500, "open": False, "sent_bytes": 12_345}
                }
            },
        },
    }
    with Store(cfg.database_path) as s:
        s.set_status("service", beat, now=now)
        s.plan_uploads(
            1, [{"target": "lab-s3", "kind": "outputs", "local_path": "/x/a.tar.gz", "remote_key": "k", "size": 700}]
        )
        s.transition(1, JobState.QC_DONE)  # waiting for its upload
    web = WebServer(cfg)
    web.start()
    try:
        m = metrics(web.url)
        assert m["imageqc_service_running"][()] == 1
        assert m["imageqc_service_start_time_seconds"][()] == pytest.approx(now - 60)
        assert m["imageqc_watch_healthy"][(("observer", "polling"), ("root", root))] == 1  # recovered: healthy
        assert m["imageqc_watch_healthy"][(("observer", "native"), ("root", "/gone"))] == 0
        assert 30 <= m["imageqc_watch_last_rescan_age_seconds"][(("root", root),)] < 300
        assert m["imageqc_watch_pending_sets"][(("root", root),)] == 2
        assert m["imageqc_upload_backlog_files"][(("target", "lab-s3"),)] == 3  # the live figures
        assert m["imageqc_upload_rate_bytes_per_second"][(("target", "lab-s3"),)] == 1500
        assert m["imageqc_upload_window_open"][(("target", "lab-s3"),)] == 0
        assert m["imageqc_upload_bytes_total"][(("target", "lab-s3"),)] == 12_345
        assert m["imageqc_waiting_sets"][()] == 3 and m["imageqc_ignored_names"][()] == 1
        page = get(web.url + "/")[2].decode()  # the waiting sets, as `imageqc status` lists them
        assert "IF image without its &lt;nuclear&gt; image" in page and "and 2 more set(s)" in page
        assert "notes.tif" in page and "not a chip serial" in page
        exposed = exposed_names(get(web.url + "/metrics")[2].decode())
        for deploy in ("prometheus.yml", "grafana-dashboard.json"):  # deploy/ uses these very names
            used = set(re.findall(r"\bimageqc_[a-z_]+", (REPO / "deploy" / deploy).read_text(encoding="utf-8")))
            assert used and used <= exposed, (deploy, used - exposed)
        with Store(cfg.database_path) as s:
            s.set_status("service", {**beat, "state": "stopped"}, now=now)
        m = metrics(web.url)
        assert m["imageqc_service_running"][()] == 0
        assert m["imageqc_upload_backlog_files"][(("target", "lab-s3"),)] == 1  # from the store
        assert m["imageqc_upload_backlog_bytes"][(("target", "lab-s3"),)] == 700
        assert "imageqc_upload_bytes_total" not in m  # no running service, no counter
    finally:
        web.stop()


def exposed_names(text: str) -> set[str]:
    """Every sample name a scrape can hold: each family's name with the suffixes its type gives it."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE):
        base = name.removesuffix("_total")
        names |= {name, base}
        names |= {f"{base}_total"} if kind == "counter" else set()
        names |= {f"{base}_{x}" for x in ("bucket", "sum", "count")} if kind == "histogram" else set()
        names |= {f"{base}_info"} if kind == "info" else set()
    return names


def test_a_real_service_serves_its_page_and_metrics_and_a_browser_shows_verdict_and_picture(make_config, tmp_path):
    cfg = web_config(make_config)
    with Store(cfg.database_path):
        pass
    web = WebServer(cfg)
    d = Daemon(cfg, target="tests.daemon.test_web:qc_with_pictures", components=[web])
    d.start()
    try:
        assert web.url and web.error is None
        # queued after the start: the run happens while the listener counts
        job_id = add_job(cfg, verdict=None)
        wait_until(
            lambda: metrics(web.url)["imageqc_jobs"][(("state", "skipped"),)] == 1,
            "the metrics to count one skipped job",
            timeout=60,
        )
        m = metrics(web.url)
        assert m["imageqc_service_running"][()] == 1
        assert m["imageqc_qc_runs_total"][(("verdict", "fail"),)] == 1
        assert m["imageqc_qc_stage_duration_seconds_count"][(("stage", "read"),)] == 1
        status, _, body = get(web.url + "/")
        assert status == 200 and f"/jobs/{job_id}" in body.decode() and REASON_HTML in body.decode()
        browser_checks(web.url, job_id, tmp_path)
    finally:
        d.stop()
    assert raw_get_refused(web)


def raw_get_refused(web: WebServer) -> bool:
    """After the service stopped, nothing listens any more."""
    try:
        raw_get(web, "/")
    except OSError:
        return True
    return False


def browser_checks(url: str, job_id: int, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip(
            "Debian's chromium is not installed (apt-get install chromium); the page was checked over HTTP only"
        )
    base = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ]
    dom = run_child([*base, "--dump-dom", f"{url}/jobs/{job_id}"], timeout=180, what="chromium", check=True).stdout
    assert "FAIL" in dom and REASON_HTML in dom and f'src="/pictures/{job_id}/track.png"' in dom
    assert "<script>alert" not in dom  # the reason's markup arrives as text
    shot = tmp_path / "job.png"
    run_child(
        [*base, f"--screenshot={shot}", "--window-size=1000,1400", f"{url}/jobs/{job_id}"],
        timeout=180,
        what="chromium",
        check=True,
    )
    import cv2
    import numpy as np

    rgb = cv2.cvtColor(cv2.imread(str(shot), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(int)
    magenta = int(np.all(rgb == PICTURE_RGB, axis=-1).sum())
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    verdict_red = int(((abs(r - 0xB0) < 40) & (g < 60) & (b < 70)).sum())  # the FAIL colour (web_pages.STYLE)
    assert magenta > 1000, "the picture was not shown in the browser"
    assert verdict_red > 5, "no red FAIL verdict text in the screenshot"
    status_dom = run_child([*base, "--dump-dom", f"{url}/"], timeout=180, what="chromium", check=True).stdout
    assert CHIP in status_dom and "FAIL" in status_dom and REASON_HTML in status_dom


# -- the page ------------------------------------------------------------------------------------


def test_pages_escape_values_set_safe_headers_and_refresh(served):
    _cfg, web, job_id = served
    for path in (
        "/",
        f"/jobs/{job_id}",
        "/metrics",
        "/style.css",
        f"/pictures/{job_id}/track.png",
        "/nope",
        "/jobs/999",
    ):
        status, headers, body = get(web.url + path)
        assert status == (404 if path in ("/nope", "/jobs/999") else 200), path
        for k, v in SAFE_HEADERS.items():
            assert headers.get(k) == v, (path, k)
    _, _, page = get(web.url + f"/jobs/{job_id}")
    text = page.decode()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in text and "<script" not in text
    assert '<meta http-equiv="refresh" content="5">' in text
    assert ">= 60" not in text and "&gt;= 60" in text  # the threshold, escaped
    status, headers, body = get(web.url + f"/pictures/{job_id}/track.png")
    assert headers["Content-Type"] == "image/png" and body.startswith(b"\x89PNG")
    req = urllib.request.Request(web.url + "/", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=scaled(30))
    assert e.value.code == 405  # read-only


def test_pictures_refuse_traversal_encoded_forms_and_symlinks_out(served, tmp_path):
    cfg, web, job_id = served
    pictures = cfg.output_dir / f"{CHIP}_run" / "pictures"
    outside = write_png(tmp_path / "secret" / "outside.png")
    (pictures / "linked.png").symlink_to(outside)
    (pictures / "passwd.png").symlink_to("/etc/passwd")
    (pictures / "notes.txt").write_text("not a picture")
    (pictures / "fake.png").write_text("not a PNG inside")
    for path in (
        f"/pictures/{job_id}/../../etc/passwd",
        f"/pictures/{job_id}/..%2f..%2f..%2fetc%2fpasswd",
        f"/pictures/{job_id}/%2e%2e%2f%2e%2e%2fsecret%2foutside.png",
        f"/pictures/{job_id}/..%5c..%5csecret%5coutside.png",
        f"/pictures/{job_id}/%252e%252e%252fsecret%252foutside.png",
        f"/pictures/{job_id}/linked.png",
        f"/pictures/{job_id}/passwd.png",
        f"/pictures/{job_id}/notes.txt",
        f"/pictures/{job_id}/fake.png",
        f"/pictures/{job_id}/%00track.png",
        "/pictures/999/track.png",
        "/pictures/../../etc/passwd",
    ):
        assert raw_get(web, path) in (403, 404), path
    assert raw_get(web, f"/pictures/{job_id}/track.png") == 200
    write_png(pictures / "Mouse_brain_α_1_track.png")  # qc.pictures keeps letters of any script
    assert raw_get(web, f"/pictures/{job_id}/{urllib.parse.quote('Mouse_brain_α_1_track.png')}") == 200
    # a job whose recorded output folder lies outside the service's output folder: nothing of it is served
    write_png(tmp_path / "elsewhere" / "pictures" / "track.png")
    other = add_job(cfg, chip="C02533C", output_dir=tmp_path / "elsewhere", fp="fp-out")
    assert raw_get(web, f"/pictures/{other}/track.png") == 404
    # a pictures folder that is a link to another folder
    linked_run = cfg.output_dir / "linked_run"
    linked_run.mkdir()
    (linked_run / "pictures").symlink_to(tmp_path / "secret", target_is_directory=True)
    third = add_job(cfg, chip="A02677B5", output_dir=linked_run, fp="fp-link")
    assert raw_get(web, f"/pictures/{third}/outside.png") == 404
    _, _, page = get(web.url + f"/jobs/{job_id}")
    assert "linked.png" not in page.decode() and "track.png" in page.decode()


# -- token and address ---------------------------------------------------------------------------


def test_a_non_loopback_address_needs_a_token_at_config_load(make_config, tmp_path):
    with pytest.raises(ConfigError) as e:
        web_config(make_config, listen="0.0.0.0:8787")
    assert "web.listen" in str(e.value) and "web.token" in str(e.value)
    with pytest.raises(ConfigError, match="reference, never the token itself"):
        web_config(make_config, extra='token = "s3cr3t-in-the-file"')
    with pytest.raises(ConfigError, match="as an address"):
        web_config(make_config, listen="8787")
    assert web_config(make_config, listen="0.0.0.0:8787", extra='token = "env:IMAGEQC_WEB_TOKEN"').web.token
    assert web_config(make_config, listen="[::1]:8787").web.listen == "[::1]:8787"  # loopback: no token needed
    embedded = load_config_text("[[watch]]\npath = 'inbox'\n", base=tmp_path)
    assert embedded.web.listen == ""  # off unless configured


def test_token_is_required_on_every_path_when_bound_beyond_loopback(make_config):
    token = "a-long-random-token-0123456789"
    cfg = web_config(make_config, listen=f"0.0.0.0:{free_port()}", extra='token = "env:IMAGEQC_WEB_TOKEN"')
    add_job(cfg)
    web = WebServer(cfg, environ={"IMAGEQC_WEB_TOKEN": token})
    web.start()
    try:
        url = f"http://127.0.0.1:{web.address[1]}"
        for path in ("/", "/metrics", "/jobs/1", "/pictures/1/track.png"):
            status, headers, _ = get(url + path)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
            assert headers["X-Frame-Options"] == "DENY"
        assert get(url + "/", headers={"Authorization": "Bearer wrong-token"})[0] == 401
        assert get(url + "/", headers={"Authorization": f"Bearer {token}"})[0] == 200
        basic = base64.b64encode(f"anyone:{token}".encode()).decode()
        assert get(url + "/jobs/1", headers={"Authorization": f"Basic {basic}"})[0] == 200
        assert metrics(url, headers={"Authorization": f"Bearer {token}"})["imageqc_jobs"][(("state", "skipped"),)] == 1
    finally:
        web.stop()
    # the token cannot be read: the page stays off (fail closed), saying why
    web = WebServer(cfg, environ={})
    with capture_logs() as logs:
        web.start()
    assert web.address is None and "IMAGEQC_WEB_TOKEN is not set" in web.error
    assert any(r["event"] == "status page and metrics are off" for r in logs)


def test_port_in_use_is_one_clear_line_and_the_service_runs_on(make_config):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        cfg = web_config(make_config, listen=f"127.0.0.1:{port}")
        web = WebServer(cfg)
        d = Daemon(cfg, target="tests.daemon.targets:ok", components=[web])
        with capture_logs() as logs:
            d.start()
        try:
            lines = [r for r in logs if r["event"] == "status page and metrics are off"]
            assert len(lines) == 1 and lines[0]["log_level"] == "error"
            assert f"port {port} is already in use" in lines[0]["error"] and "web.listen" in lines[0]["error"]
            job_id = add_job(cfg, verdict=None)
            with Store(cfg.database_path) as s:  # the service still does its work
                wait_job(s, job_id, timeout=60, state="skipped")
                health = s.get_status()["service"][0]["components"]["web"]
                assert f"port {port} is already in use" in health["error"]
        finally:
            d.stop()


def test_scrapes_use_their_own_read_only_connection(served):
    cfg, web, job_id = served
    with Store(cfg.database_path) as s, s.db() as c:  # the service holds a write transaction
        c.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (time.time(), job_id))
        m = metrics(web.url)  # answered meanwhile, from the last committed state
        assert m["imageqc_jobs"][(("state", "skipped"),)] == 1
