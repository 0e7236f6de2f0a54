"""Start-up without re-hashing unchanged files: the verification record (``runtime.verified``)
lets a load skip a file whose size, times, inode and device are what they were when it last
matched its sha256; a changed file is hashed again and refused; ``fila verify`` re-hashes all."""

from __future__ import annotations

import os

import pytest
from conftest import copy_export, run_fila

from runtime.errors import ManifestError
from runtime.manifest import Manifest
from runtime.verified import RECORD, cache_record

pytestmark = pytest.mark.board


def open_decoder(art) -> Manifest:
    manifest = Manifest.load(art)
    manifest.stage_path("decoder_gqa")
    return manifest


def test_a_second_start_hashes_nothing_that_did_not_change(tiny_artifacts, tmp_path):
    art = copy_export(tiny_artifacts, tmp_path / "art")
    first = open_decoder(art)
    assert "decoder_gqa.onnx" in first.hashed and (art / RECORD).is_file()
    second = open_decoder(art)
    assert second.hashed == [] and "decoder_gqa.onnx" in second.checked


def test_a_file_changed_in_place_is_hashed_again_and_refused(tiny_artifacts, tmp_path):
    """Same size, modification time put back: the change time still moves."""
    art = copy_export(tiny_artifacts, tmp_path / "art")
    open_decoder(art)
    path = art / "decoder_gqa.onnx"
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ManifestError, match="does not match the manifest"):
        open_decoder(art)


def test_fila_verify_rehashes_every_file(tiny_artifacts, tmp_path):
    art = copy_export(tiny_artifacts, tmp_path / "art")
    manifest = Manifest.load(art)
    manifest.verify()
    again = Manifest.load(art)
    again.verify()
    assert set(again.hashed) == {e["file"] for e in again.files().values()}
    assert run_fila("verify", str(art)).returncode == 0


def test_where_the_folder_cannot_take_the_record_the_user_cache_does(
    tiny_artifacts, tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    art = copy_export(tiny_artifacts, tmp_path / "art")
    (art / RECORD).mkdir()  # a folder where the record file would go: not writable as a file
    open_decoder(art)
    assert cache_record(art).is_file()
    assert open_decoder(art).hashed == []
