"""Checkpoint save/load round trip and every bad-checkpoint case."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fila_export.checkpoint import load_checkpoint, save_checkpoint
from runtime.errors import CheckpointError


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_round_trip_is_exact(tiny_checkpoint, tmp_path):
    model, _ = load_checkpoint(tiny_checkpoint)
    again_dir = save_checkpoint(model, tmp_path / "again")
    again, _ = load_checkpoint(again_dir)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((again_dir / "config.json").read_text()) == json.loads(
        (tiny_checkpoint / "config.json").read_text()
    )


def test_sharded_round_trip(tiny_checkpoint, tmp_path):
    model, _ = load_checkpoint(tiny_checkpoint)
    folder = save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=200_000)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    again, _ = load_checkpoint(folder)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_missing_config(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(folder)


def test_missing_weights_and_pickles_refused(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(
        CheckpointError, match=r"no \*\.safetensors.*pytorch_model\.bin.*pickle is never loaded"
    ):
        load_checkpoint(folder)


def test_missing_shard(tiny_checkpoint, tmp_path):
    model, _ = load_checkpoint(tiny_checkpoint)
    folder = save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=200_000)
    victim = sorted(folder.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim.name}.*missing"):
        load_checkpoint(folder)


def test_index_pointing_outside_is_refused(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "../outside.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_checkpoint(folder)


def _edit_weights(folder, fn):
    path = folder / "model.safetensors"
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path))


def test_missing_keys_listed_with_count(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _edit_weights(folder, lambda s: [s.pop(k) for k in [k for k in s if "cvfm.1." in k]])
    with pytest.raises(CheckpointError, match=r"7 missing key\(s\): cvfm\.1\.fc1\.bias"):
        load_checkpoint(folder)


def test_unexpected_keys_listed(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _edit_weights(folder, lambda s: s.update({"mystery.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): mystery\.weight"):
        load_checkpoint(folder)


def test_shape_mismatch_names_key_and_shapes(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _edit_weights(folder, lambda s: s.update({"image_newline": torch.zeros(7)}))
    with pytest.raises(CheckpointError, match=r"image_newline.*\(64,\).*\(7,\)"):
        load_checkpoint(folder)


def test_unknown_architecture(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown architecture.*'bert'"):
        load_checkpoint(folder)


def test_unsupported_text_model(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'gpt2' is not supported"):
        load_checkpoint(folder)


def test_corrupt_weights_file(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(folder)


def test_fila_weights_without_fila_config(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["fila"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected.*no 'fila' block"):
        load_checkpoint(folder)


def test_legacy_and_current_transformers_key_layouts(tiny_llava_checkpoint, tmp_path):
    """Keys as transformers holds them in memory (model.vision_tower..., lm_head) also load."""
    folder = _copy(tiny_llava_checkpoint, tmp_path)
    renames = {
        "vision_tower.": "model.vision_tower.vision_model.",
        "multi_modal_projector.": "model.multi_modal_projector.",
        "language_model.model.": "model.language_model.",
        "language_model.lm_head.": "lm_head.",
        "image_newline": "model.image_newline",
    }

    def rename(state):
        for key in list(state):
            for old, new in renames.items():
                if key.startswith(old):
                    state[new + key[len(old) :]] = state.pop(key)
                    break

    _edit_weights(folder, rename)
    a, _ = load_checkpoint(tiny_llava_checkpoint)
    b, _ = load_checkpoint(folder)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
