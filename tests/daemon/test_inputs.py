"""Recording a scan set's inputs after QC (daemon.inputs.record_inputs), on real files."""

from __future__ import annotations

import hashlib
import os

import pytest

import daemon.inputs as inputs_mod
from daemon.inputs import InputsChanged, identity, record_inputs


def test_digests_already_taken_are_not_taken_again_and_a_changed_file_is_still_caught(tmp_path, monkeypatch):
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    a.write_bytes(b"A" * 1000)
    b.write_bytes(b"B" * 1000)
    before = {p: identity(p) for p in (a, b)}
    hashed: list[str] = []
    real = inputs_mod.sha256_file
    monkeypatch.setattr(inputs_mod, "sha256_file", lambda p, **k: hashed.append(p.name) or real(p, **k))
    known = {a: hashlib.sha256(a.read_bytes()).hexdigest()}
    rec = record_inputs(before, known=known)
    assert hashed == ["b.tif"]  # a's digest came from live QC / the stitching
    assert rec[str(a)]["sha256"] == known[a] and rec[str(b)]["sha256"] == hashlib.sha256(b"B" * 1000).hexdigest()
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched after QC started
    with pytest.raises(InputsChanged, match="changed while QC ran"):
        record_inputs(before, known=known)
