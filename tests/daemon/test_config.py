"""Config: defaults, every kind of error (file, key path, line), the example file."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import (
    Config,
    default_config,
    example_toml,
    iter_fields,
    load_config,
    load_config_text,
    parse_bandwidth,
    parse_window,
)
from daemon.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_embedded_default_watches_inbox_keeps_state_locally_and_uploads_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = default_config()
    assert [w.path for w in cfg.watch] == [tmp_path / "inbox"]
    assert cfg.state_dir == tmp_path / ".imageqc"
    assert cfg.upload == ()
    assert cfg.database_path == tmp_path / ".imageqc" / "imageqc.sqlite3"
    assert cfg.output_dir == tmp_path / ".imageqc" / "outputs"
    assert cfg.source == "<embedded default>"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.state_dir = Path("x")  # type: ignore[misc]


def test_relative_paths_resolve_against_the_config_file_folder(tmp_path):
    sub = tmp_path / "etc"
    sub.mkdir()
    f = sub / "site.toml"
    f.write_text('state_dir = "state"\n[[watch]]\npath = "../scans"\n[[watch]]\npath = "/abs/scans"\n')
    cfg = load_config(f)
    assert cfg.state_dir == sub / "state"
    assert cfg.watch[0].path == sub / ".." / "scans"
    assert cfg.watch[1].path == Path("/abs/scans")


def test_tile_overlap_takes_one_number_for_both_axes_or_two(tmp_path):
    one = load_config_text("[[watch]]\npath = 'a'\ntile_overlap = [0.2]\n", file="x.toml", base=tmp_path)
    two = load_config_text("[[watch]]\npath = 'a'\ntile_overlap = [0.26, 0]\n", file="x.toml", base=tmp_path)
    assert one.watch[0].tile_overlap_xy == (0.2, 0.2) and two.watch[0].tile_overlap_xy == (0.26, 0.0)
    assert load_config_text("[[watch]]\npath = 'a'\n", file="x.toml", base=tmp_path).watch[0].tile_overlap_xy == (
        0.1,
        0.1,
    )


def test_tile_pattern_takes_row_and_col_or_an_index(tmp_path):
    cfg = load_config_text(
        "[[watch]]\npath = 'a'\ntile_pattern = 'field(?P<index>\\d+)'\n", file="x.toml", base=tmp_path
    )
    assert cfg.watch[0].tile_pattern == "field(?P<index>\\d+)"


def test_stitching_stage_limit_reaches_the_qc_settings(tmp_path):
    from daemon.jobs import qc_settings

    cfg = load_config_text("[qc]\nstitching_stage_limit_px = 25\n", file="x.toml", base=tmp_path)
    assert qc_settings(cfg).stitching_stage_limit_px == 25.0
    assert qc_settings(load_config_text("", file="x.toml", base=tmp_path)).stitching_stage_limit_px == 0.0


def _err(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        load_config_text(text, file="site.toml", base=Path("/tmp"))
    return ei.value


@pytest.mark.parametrize(
    ("text", "key", "line", "words"),
    [
        # unknown key, with a suggestion
        ("[site]\nname = 'x'\nopertor = 'y'\n", "site.opertor", 3, "did you mean 'operator'"),
        ("[qc.thresholds]\ntrak = 50\n", "qc.thresholds.trak", 2, "did you mean 'track'"),
        (
            "[[watch]]\npath = 'a'\n[[watch]]\npath = 'b'\nsettle_secs = 3\n",
            "watch[1].settle_secs",
            5,
            "did you mean 'settle_seconds'",
        ),
        ("[sevice]\n", "sevice", 1, "did you mean 'service'"),
        # wrong type
        ("[qc]\nthreads = '4'\n", "qc.threads", 2, "must be a whole number"),
        ("[[watch]]\npath = 'a'\nrecursive = 'yes'\n", "watch[0].recursive", 3, "must be true or false"),
        ("[[watch]]\npath = 5\n", "watch[0].path", 2, "must be a string"),
        ("watch = 'inbox'\n", "watch", 1, "must be a list"),
        ("[qc]\nthresholds = 3\n", "qc.thresholds", 2, "must be a table"),
        # out of range
        ("[[watch]]\npath = 'a'\nsettle_seconds = -5\n", "watch[0].settle_seconds", 3, "must be >= 0"),
        ("[qc.thresholds]\ncalibration_similarity = 1.5\n", "qc.thresholds.calibration_similarity", 2, "must be <= 1"),
        ("[service]\nworkers = 0\n", "service.workers", 2, "must be >= 1"),
        # bad choice
        ("[[watch]]\npath = 'a'\nobserver = 'poling'\n", "watch[0].observer", 3, "did you mean 'polling'"),
        ("[qc]\npriority = 'idle'\n", "qc.priority", 2, "must be one of low, below_normal, normal"),
        # missing required
        ("[[upload]]\ntype = 's3'\nbucket = 'b'\n", "upload[0].name", 1, "missing required"),
        ("[[upload]]\nname = 'x'\ntype = 's3'\n", "upload[0].bucket", 1, "missing required"),
        ("[[upload]]\nname = 'h'\ntype = 'hpc'\n", "upload[0].path", 1, "missing required"),
        ("[[upload]]\nname = 'o'\ntype = 'oss'\nbucket = 'b'\n", "upload[0].endpoint", 1, "missing required"),
        # values that parse but mean nothing
        ("[[upload]]\nname = 'x'\nbucket = 'b'\nwindow = '25:00-06:00'\n", "upload[0].window", 4, "HH:MM-HH:MM"),
        (
            "[[upload]]\nname = 'x'\nbucket = 'b'\nbandwidth_limit = 'fast'\n",
            "upload[0].bandwidth_limit",
            4,
            "as a rate",
        ),
        (
            "[[upload]]\nname = 'x'\nbucket = 'b'\nkey_template = '{chip}/{nme}'\n",
            "upload[0].key_template",
            4,
            "unknown field",
        ),
        ("[[upload]]\nname = 'x'\nbucket = 'b'\nendpoint = 'minio:9000'\n", "upload[0].endpoint", 4, "not a URL"),
        (
            "[[upload]]\nname = 'x'\nbucket = 'b'\ncredentials = 'AKIA123'\n",
            "upload[0].credentials",
            4,
            "never the secret",
        ),
        ("[[upload]]\nname = 'a'\nbucket = 'b'\n[[upload]]\nname = 'a'\nbucket = 'c'\n", "upload[1].name", 5, "unique"),
        ("[[watch]]\npath = 'a'\ntile_pattern = '(?P<row>\\d+)'\n", "watch[0].tile_pattern", 3, "(?P<col>"),
        (
            "[[watch]]\npath = 'a'\ntile_overlap = [0.1, 0.2, 0.3]\n",
            "watch[0].tile_overlap",
            3,
            "must be a list of 1 to 2 values, got 3",
        ),
        ("[[watch]]\npath = 'a'\ntile_overlap = [0.1, 0.95]\n", "watch[0].tile_overlap[1]", 3, "must be <= 0.9"),
        ("[[watch]]\npath = 'a'\ntile_overlap = 0.2\n", "watch[0].tile_overlap", 3, "must be a list"),
        ("[site]\nname = 'my site'\n", "site.name", 2, "not allowed"),
        ("watch = []\n", "watch", 1, "at least one"),
        ("[qc]\nmodel = 'nowhere.onnx'\n", "qc.model", 2, "no file at"),
        ("[qc]\nmodel_preset = 'stomics-4class'\n", "qc.model_preset", 2, "only used with qc.model"),
        ("[qc]\nmodel_preset = 'stomics'\n", "qc.model_preset", 2, "did you mean 'stomics-4class'"),
    ],
)
def test_each_kind_of_error_names_file_key_and_line(text, key, line, words):
    err = _err(text)
    assert err.key == key
    assert err.line == line
    assert words in str(err)
    assert str(err).startswith(f"site.toml:{line}: {key}: ")
    assert "\n" not in str(err)


def test_a_secret_in_the_config_is_refused_without_echoing_it():
    err = _err("[[upload]]\nname = 'x'\nbucket = 'b'\nsecret_access_key = 'wJalrXUtnFEMI/K7MDENG'\n")
    assert err.key == "upload[0].secret_access_key"
    assert "credentials" in str(err)
    assert "wJalrXUtnFEMI" not in str(err)


def test_unreadable_toml_names_the_line():
    err = _err("[site]\nname = 'x'\n\n[qc\nthreads = 2\n")
    assert err.line == 4
    assert "not valid TOML" in str(err)


def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe[site]\n")
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(bad)


def test_output_folder_inside_a_watch_root_is_refused(tmp_path):
    err = _err("[[watch]]\npath = '/data/scans'\n[output]\ndir = '/data/scans/qc'\n")
    assert err.key == "output.dir"
    assert "outside the watched folders" in str(err)


def test_rate_and_window_parsers():
    assert parse_bandwidth("") == 0
    assert parse_bandwidth("20MB/s") == 20_000_000
    assert parse_bandwidth("512 KiB/s") == 512 * 1024
    assert parse_bandwidth("100Mbit/s") == 12_500_000
    assert parse_window("") is None
    assert parse_window("20:00-06:00") == (1200, 360)
    assert parse_window("8:30 - 17:00") == (510, 1020)
    for bad, why in (
        ("20-6", "as a daily window"),
        ("10:00-10:00", "start and end are equal"),
        ("24:30-01:00", "as a daily window"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_window(bad)


def test_example_config_is_the_generated_one_and_loads():
    example = REPO / "config.example.toml"
    assert example.read_text(encoding="utf-8") == example_toml(), (
        "config.example.toml is out of date: regenerate it with `imageqc config example > config.example.toml`"
    )
    cfg = load_config(example)
    defaults = Config()
    # every non-path setting in the example is the code's default
    assert cfg.site == defaults.site
    assert cfg.discovery == defaults.discovery
    assert cfg.qc == defaults.qc
    assert cfg.output == defaults.output
    assert cfg.logging == defaults.logging
    assert cfg.service == defaults.service
    assert cfg.notify == defaults.notify
    assert dataclasses.replace(cfg.watch[0], path=defaults.watch[0].path) == defaults.watch[0]


def test_example_config_documents_every_field():
    text = (REPO / "config.example.toml").read_text(encoding="utf-8")
    section = ""
    seen: set[str] = set()
    for raw in text.splitlines():
        line = raw.lstrip("# ").rstrip()
        m = re.match(r"^\[\[?([a-z_.]+)\]\]?$", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^([a-z_]+) = ", line)
        if m:
            seen.add(f"{section}.{m.group(1)}" if section else m.group(1))
    expected = {kp.replace("[]", "") for kp, _ in iter_fields()}
    assert expected - seen == set(), f"settings missing from config.example.toml: {sorted(expected - seen)}"


def test_example_upload_block_uncommented_is_a_valid_target(tmp_path):
    text = (REPO / "config.example.toml").read_text(encoding="utf-8")
    block = text.split("# [[upload]]\n", 1)[1].split("\n\n# An S3-compatible", 1)[0]
    body = "\n".join(line[2:] for line in block.splitlines() if re.match(r"^# [a-z_]+ = ", line))
    body = body.replace('name = ""', 'name = "lab"').replace('bucket = ""', 'bucket = "b"')
    cfg = load_config_text("[[upload]]\n" + body + "\n", base=tmp_path)
    assert cfg.upload[0].name == "lab"
    assert cfg.upload[0].key_template == "{prefix}/{site}/{chip}/{run}/{name}"


def test_config_check_cli_ok_and_errors_exit_2(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text(
        '[[watch]]\npath = "scans"\n[[upload]]\nname = "minio"\nbucket = "b"\n'
        'endpoint = "https://qc:hunter2@minio.lab:9000"\ncredentials = "env:MINIO"\n'
    )
    assert main(["config", "check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and 'name = "minio"' in out
    assert "hunter2" not in out and "***@minio.lab" in out
    bad = tmp_path / "bad.toml"
    bad.write_text("[[watch]]\npath = 'scans'\nsettle_seconds = 'soon'\n")
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"imageqc: {bad}:3: watch[0].settle_seconds: must be a number, got a string 'soon'"]


def test_config_check_reports_every_error_at_once_and_warns_about_missing_watch_folders(tmp_path, capsys):
    """#15: one error per run made fixing a site file a loop; a watch folder that does not exist was not mentioned."""
    bad = tmp_path / "site.toml"
    bad.write_text(
        "[site]\nopertor = 'ana'\n"  # 2: unknown key
        "[[watch]]\npath = 'scans'\nsettle_seconds = -5\n"  # 5: out of range
        "[[watch]]\npath = 'more'\nnaming = 'strictest'\n"  # 8: not a choice
        "[[upload]]\nname = 'hpc'\ntype = 'hpc'\n"  # 9: hpc without a path (a cross-setting check)
        "[qc]\nthreads = 'two'\n"  # 13: wrong type
    )
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"imageqc: {bad}:2: site.opertor: unknown setting; did you mean 'operator'?",
        f"{bad}:5: watch[0].settle_seconds: must be >= 0 (got -5)",
        f"{bad}:8: watch[1].naming: must be one of strict, lenient (got 'strictest'); did you mean 'strict'?",
        f"{bad}:9: upload[0].path: missing required setting for an hpc target (a mounted folder or UNC share)",
        f"{bad}:13: qc.threads: must be a whole number, got a string 'two'",
    ]
    good = tmp_path / "good.toml"
    good.write_text("[[watch]]\npath = 'not-there-yet'\n")
    assert main(["config", "check", str(good)]) == 0
    out, err = capsys.readouterr()
    assert "valid (1 warning(s) above)" in out
    assert f"watch[0].path: the folder {tmp_path / 'not-there-yet'} does not exist here" in err
    assert main(["config", "check", str(good), "--json"]) == 0
    assert "does not exist here" in json.loads(capsys.readouterr().out)["warnings"][0]


def test_optional_paths_resolve_against_the_config_folder_too(tmp_path):
    f = tmp_path / "site.toml"
    (tmp_path / "m.json").write_text("{}")
    f.write_text(
        '[output]\ndir = "out"\n[logging]\nfile = "logs/x.jsonl"\n[qc]\nmodel = "m.json"\n'
        '[[upload]]\nname = "h"\ntype = "hpc"\npath = "//nas/share"\n'
    )
    cfg = load_config(f)
    assert cfg.output_dir == tmp_path / "out"
    assert cfg.log_file == tmp_path / "logs" / "x.jsonl"
    assert cfg.qc.model == str(tmp_path / "m.json")
    assert cfg.upload[0].path == "//nas/share"  # UNC stays as written
