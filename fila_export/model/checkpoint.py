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


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
        for key, value in tensors.items():
            state[canonical_key(key)] = value
    return state


def _listing(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(model: FilaForConditionalGeneration, state: dict[str, torch.Tensor]) -> None:
    """Refuse missing, unexpected or mis-shaped tensors, naming the keys."""
    expected = model.state_dict()
    optional = {"language_model.lm_head.weight"} if model.tied_embeddings else set()
    missing = set(expected) - set(state) - optional
    unexpected = {k for k in set(state) - set(expected) if not k.startswith(IGNORED_PREFIXES)}
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
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"shape mismatch for {key}: the config expects {tuple(expected[key].shape)}, "
                f"the checkpoint has {tuple(tensor.shape)}"
            )


def load_checkpoint(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Load a checkpoint folder -> (model in eval mode, config)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    try:
        config = FilaConfig.from_pretrained(folder)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder / 'config.json'} is not valid JSON ({exc})") from exc
    except ConfigError as exc:
        raise CheckpointError(f"{folder}: {exc}") from exc
    state = read_state_dict(folder)
    model = FilaForConditionalGeneration(config)
    check_state_dict(model, state)
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    if model.tied_embeddings and _saved_head_differs(state):
        warnings.warn(
            f"{folder}: config.json says tie_word_embeddings, but the saved lm_head.weight "
            "differs from embed_tokens.weight; using the saved head (as transformers does)",
            stacklevel=2,
        )
        config.text["tie_word_embeddings"] = False
        model.language_model.config.tie_word_embeddings = False
    model.load_state_dict(state, strict=False, assign=True)
    if model.tied_embeddings:
        model.language_model.tie_weights()
    return model.to(dtype).eval(), config


def _saved_head_differs(state: dict[str, torch.Tensor]) -> bool:
    head = state.get("language_model.lm_head.weight")
    embed = state.get("language_model.model.embed_tokens.weight")
    return head is not None and embed is not None and not torch.equal(head, embed)


def save_checkpoint(
    model: FilaForConditionalGeneration,
    folder: str | Path,
    max_shard_bytes: int | None = None,
    tokenizer_vocab: int | None = None,
) -> Path:
    """Write the checkpoint layout ``load_checkpoint`` reads (and transformers reads too)."""
    from safetensors.torch import save_file

    from fila_export.model.tokenizer import write_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    (folder / "preprocessor_config.json").write_text(
        json.dumps(config.preprocessor_dict(), indent=2)
    )
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.tied_embeddings:
        state.pop("language_model.lm_head.weight", None)
    shards = _shard(state, max_shard_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_NAME), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name), metadata=meta)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    if not (folder / "tokenizer.json").exists():
        write_tokenizer(
            folder, tokenizer_vocab or config.vocab_size, config.max_position_embeddings
        )
    return folder


def _shard(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [state]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def init_checkpoint(preset_name: str, out: str | Path, seed: int = 0) -> Path:
    """A deterministic random checkpoint from a named preset (tests, demos, benchmarks)."""
    from fila_export.model.config import preset

    config = preset(preset_name)
    torch.manual_seed(seed)
    model = FilaForConditionalGeneration(config)
    model.init_weights(seed)
    return save_checkpoint(model, out)
