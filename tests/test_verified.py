"""Start-up without re-hashing unchanged files: the verification record (``runtime.verified``)
lets a load skip a file whose size, times, inode and device are what they were when it last
matched its sha256; a changed file is hashed again and refused; ``fila verify`` re-hashes all."""

from __future__ import annotations

import io
import os
import time
from unittest import mock

import pytest
from conftest import copy_export, run_fila

from runtime.errors import ManifestError
from runtime.manifest import Manifest
from runtime.verified import RACY_S, RECORD, cache_record

pytestmark = pytest.mark.board


def open_decoder(art) -> Manifest:
    manifest = Manifest.load(art)
    manifest.stage_path("decoder_gqa")
    return manifest


def settled_copy(tiny_artifacts, tmp_path):
    """A copy of the export old enough to be recorded (files changed within ``RACY_S`` are
    hashed but not recorded: they may change again within the same timestamp tick)."""
    art = copy_export(tiny_artifacts, tmp_path / "art")
    time.sleep(RACY_S * 2)
    return art


def test_a_second_start_hashes_nothing_that_did_not_change(tiny_artifacts, tmp_path):
    art = settled_copy(tiny_artifacts, tmp_path)
    first = open_decoder(art)
    assert "decoder_gqa.onnx" in first.hashed and (art / RECORD).is_file()
    second = open_decoder(art)
    assert second.hashed == [] and "decoder_gqa.onnx" in second.checked


def test_a_file_changed_in_place_is_hashed_again_and_refused(tiny_artifacts, tmp_path):
    """Same size, modification time put back: the change time still moves."""
    art = settled_copy(tiny_artifacts, tmp_path)
    open_decoder(art)
    path = art / "decoder_gqa.onnx"
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ManifestError, match="does not match the manifest"):
        open_decoder(art)


def test_a_file_replaced_while_it_is_hashed_is_not_recorded(tiny_artifacts, tmp_path):
    """rsync's way: a new file renamed over the old one. The old file's bytes were hashed, so
    the identity recorded must not be the new file's (it would never be hashed again)."""
    art = settled_copy(tiny_artifacts, tmp_path)
    path = art / "decoder_gqa.onnx"
    original = path.read_bytes()
    replacement = bytearray(original)
    replacement[-1] ^= 0xFF

    class Swapping(io.FileIO):  # the rename lands between the open and the end of the read
        def readinto(self, buffer):
            n = super().readinto(buffer)
            if n and not hasattr(self, "swapped"):
                self.swapped = True
                (art / "new.tmp").write_bytes(bytes(replacement))
                os.replace(art / "new.tmp", path)
            return n

    manifest = Manifest.load(art)
    entry = manifest.variant("decoder_gqa")
    with mock.patch(
        "builtins.open", lambda p, mode="r", *a, **k: Swapping(p, mode.replace("b", ""))
    ):
        digest = manifest.verified.sha256("decoder_gqa.onnx", path, entry["sha256"])
    assert digest == entry["sha256"]  # the old bytes: they matched
    assert "decoder_gqa.onnx" not in manifest.verified.entries  # but nothing was vouched for
    time.sleep(RACY_S * 2)
    with pytest.raises(ManifestError, match="does not match the manifest"):
        open_decoder(art)  # the new file is hashed, and refused


def test_a_file_changed_just_now_is_hashed_but_not_recorded(tiny_artifacts, tmp_path):
    art = copy_export(tiny_artifacts, tmp_path / "art")  # every file changed a moment ago
    assert open_decoder(art).hashed and open_decoder(art).hashed  # hashed both times
    time.sleep(RACY_S * 2)
    open_decoder(art)
    assert open_decoder(art).hashed == []


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
    art = settled_copy(tiny_artifacts, tmp_path)
    (art / RECORD).mkdir()  # a folder where the record file would go: not writable as a file
    open_decoder(art)
    assert cache_record(art).is_file()
    assert open_decoder(art).hashed == []
