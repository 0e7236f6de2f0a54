"""Checkpoint save/load round trip and every bad-checkpoint case."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fila_export.model.checkpoint import load_checkpoint, save_checkpoint
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


def tied_checkpoint(folder):
    import dataclasses
    import warnings

    from fila_export.model.config import preset
    from fila_export.model.fila import FilaForConditionalGeneration

    config = preset("tiny")
    config = dataclasses.replace(config, text=config.text | {"tie_word_embeddings": True})
    model = FilaForConditionalGeneration(config)
    model.init_weights(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return save_checkpoint(model, folder)


def test_tied_checkpoint_loads_tied_without_a_warning(tmp_path):
    import warnings

    folder = tied_checkpoint(tmp_path / "tied")
    assert "language_model.lm_head.weight" not in load_file(folder / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, config = load_checkpoint(folder)
    lm = model.language_model
    assert lm.lm_head.weight is lm.get_input_embeddings().weight
    assert config.text["tie_word_embeddings"] is True


def test_a_saved_head_that_differs_from_a_tied_embedding_is_kept(tmp_path):
    """config.json says tied, the file holds its own head: load what the file holds (as
    transformers does), warn, and the logits come from that head."""
    folder = tied_checkpoint(tmp_path / "tied")
    state = load_file(folder / "model.safetensors")
    embed = state["language_model.model.embed_tokens.weight"]
    head = torch.randn(embed.shape, generator=torch.Generator().manual_seed(1))
    save_file(state | {"language_model.lm_head.weight": head}, folder / "model.safetensors")
    with pytest.warns(UserWarning, match="using the saved head"):
        model, config = load_checkpoint(folder)
    lm = model.language_model
    assert torch.equal(lm.lm_head.weight, head)
    assert torch.equal(lm.get_input_embeddings().weight, embed)
    assert config.text["tie_word_embeddings"] is False
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        hidden = lm.model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(lm(input_ids=ids).logits, hidden @ head.T)
