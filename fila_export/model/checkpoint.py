"""Checkpoint folders: ``config.json`` + ``*.safetensors`` (sharded or not) + tokenizer files.

Loads FILA checkpoints and transformers' LLaVA-NeXT checkpoints (a FILA without the ConvNeXt
branch), current and legacy key layouts. Safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from fila_export.model.config import FilaConfig
from fila_export.model.fila import FilaForConditionalGeneration
from fila_export.model.weights import (
    ShardWriter,
    WeightStore,
    params_on_meta,
    torch_dtype,
)
from runtime.errors import CheckpointError, ConfigError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# (prefix in a file, prefix in our model): transformers' newer in-memory layout and the older
# ``vision_model.`` nesting both map onto the saved LLaVA-NeXT layout that our modules use.
KEY_ALIASES = [
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.convnext.", "convnext."),
    ("model.cvfm.", "cvfm."),
]
# Weights a checkpoint may carry that the model does not use (ConvNeXt classifier head, CLIP's
# post-LayerNorm is kept since transformers' model has it).
IGNORED_PREFIXES = ("convnext.head.", "convnext.norm_pre.")


def canonical_key(key: str) -> str:
    for old, new in KEY_ALIASES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when sharded."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from exc
        paths = []
        for name in shards:
            path = (folder / name).resolve()
            if folder.resolve() not in path.parents:
                raise CheckpointError(f"{index} points outside the checkpoint folder: {name!r}")
            if not path.is_file():
                raise CheckpointError(
                    f"shard {name} listed in {INDEX_NAME} is missing from {folder}"
                )
            paths.append(path)
        return paths
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    hint = (
        f" (found {', '.join(pickles)}: pickle is never loaded; convert to safetensors)"
        if pickles
        else ""
    )
    raise CheckpointError(f"no *.safetensors weights in {folder}{hint}")


def open_weights(folder: Path) -> WeightStore:
    """The checkpoint's tensors by canonical key, read one at a time when asked for."""
    return WeightStore(weight_files(folder), canonical_key)


def _listing(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_weights(model: FilaForConditionalGeneration, shapes: dict[str, tuple]) -> None:
    """Refuse missing, unexpected or mis-shaped tensors, naming the keys (``shapes``: the
    checkpoint's key -> shape)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional = {"language_model.lm_head.weight"} if model.tied_embeddings else set()
    missing = set(expected) - set(shapes) - optional
    unexpected = {k for k in set(shapes) - set(expected) if not k.startswith(IGNORED_PREFIXES)}
    if missing:
        hint = ""
        fusion = {k for k in expected if k.startswith(("convnext.", "cvfm."))}
        if fusion and fusion <= missing:
            hint = " (config.json has a 'fila' block but the weights have no ConvNeXt/CVFM)"
        raise CheckpointError(f"{len(missing)} missing key(s): {_listing(missing)}{hint}")
    if unexpected:
        hint = ""
        if any(k.startswith(("convnext.", "cvfm.")) for k in unexpected):
            hint = " (the weights have a ConvNeXt branch but config.json has no 'fila' block)"
        raise CheckpointError(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}{hint}")
    for key, shape in shapes.items():
        if key in expected and tuple(shape) != expected[key]:
            raise CheckpointError(
                f"shape mismatch for {key}: the config expects {expected[key]}, "
                f"the checkpoint has {tuple(shape)}"
            )


def open_model(folder: str | Path) -> tuple[FilaForConditionalGeneration, FilaConfig, WeightStore]:
    """The checkpoint's model with its parameters on the meta device (no memory), its config and
    its checked weight store: what the export needs to load one stage's weights at a time."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    try:
        config = FilaConfig.from_pretrained(folder)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder / 'config.json'} is not valid JSON ({exc})") from exc
    except ConfigError as exc:
        raise CheckpointError(f"{folder}: {exc}") from exc
    store = open_weights(folder)
    with params_on_meta():
        model = FilaForConditionalGeneration(config)
    check_weights(model, {key: store.shape(key) for key in store.keys()})
    if model.tied_embeddings and _saved_head_differs(store):
        warnings.warn(
            f"{folder}: config.json says tie_word_embeddings, but the saved lm_head.weight "
            "differs from embed_tokens.weight; using the saved head (as transformers does)",
            stacklevel=3,
        )
        config.text["tie_word_embeddings"] = False
        with params_on_meta():
            model = FilaForConditionalGeneration(config)
    if model.tied_embeddings:
        model.language_model.tie_weights()
    return model.eval(), config, store


def load_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Load a checkpoint folder -> (model in eval mode, config); one copy of each weight."""
    model, config, store = open_model(folder)
    state = {key: store.get(key, dtype) for key in model.state_dict() if key in store.where}
    model.load_state_dict(state, strict=False, assign=True)
    if model.tied_embeddings:
        model.language_model.tie_weights()
    return model, config


def _saved_head_differs(store: WeightStore) -> bool:
    keys = ("language_model.lm_head.weight", "language_model.model.embed_tokens.weight")
    if not all(k in store.where for k in keys):
        return False
    return not torch.equal(store.get(keys[0]), store.get(keys[1]))


def write_config_files(
    config: FilaConfig, folder: Path, tokenizer_vocab: int | None = None
) -> None:
    """``config.json``, ``preprocessor_config.json`` and (unless present) the tokenizer files."""
    from fila_export.model.tokenizer import write_tokenizer

    (folder / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    (folder / "preprocessor_config.json").write_text(
        json.dumps(config.preprocessor_dict(), indent=2)
    )
    if not (folder / "tokenizer.json").exists():
        write_tokenizer(
            folder, tokenizer_vocab or config.vocab_size, config.max_position_embeddings
        )


def save_checkpoint(
    model: FilaForConditionalGeneration,
    folder: str | Path,
    max_shard_bytes: int | None = None,
    tokenizer_vocab: int | None = None,
) -> Path:
    """Write the checkpoint layout ``load_checkpoint`` reads (and transformers reads too)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, max_shard_bytes)
    for key, value in model.state_dict().items():
        if not (model.tied_embeddings and key == "language_model.lm_head.weight"):
            writer.add(key, value.detach())
    writer.close()
    write_config_files(model.config, folder, tokenizer_vocab)
    return folder


def init_checkpoint(preset_name: str, out: str | Path, seed: int = 0, dtype: str = "fp32") -> Path:
    """A deterministic random checkpoint from a named preset (tests, demos, benchmarks), written
    tensor by tensor into shards of at most 2 GB: the model itself never exists in memory."""
    from fila_export.model.config import preset

    config = preset(preset_name)
    target = torch_dtype(dtype)
    with params_on_meta():
        model = FilaForConditionalGeneration(config)
    model.language_model.tie_weights()  # a tied head is the embedding: written once
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder)
    for key, value in model.random_parameters(seed):
        writer.add(key, value.to(target))
    writer.close()
    write_config_files(config, folder)
    return folder
