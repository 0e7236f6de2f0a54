"""``fila validate --record``: PyTorch's answers stored next to an export, so a board without torch
can validate against them (``runtime.reference``).

The bundle holds, per image, every exported stage's inputs and PyTorch's outputs (the decoder
stages at a decode step after the prompt's last ``WINDOW`` positions, to stay megabytes at 2 B
parameters), PyTorch's greedy tokens for the prompt, and the images themselves; every file is
hash-listed in the manifest. Arrays are one ``.npz`` (read with ``allow_pickle=False``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from fila_export.validation.parity import reference_side, stage_feeds
from runtime.manifest import file_entry
from runtime.parity import PROMPT
from runtime.reference import ARRAYS, INFO, REFERENCE_DIR, array_key, image_label

WINDOW = 64


def record_reference(
    artifacts: str | Path,
    checkpoint: str | Path,
    images: str | Path | None = None,
    tokens: int = 32,
    max_images: int = 3,
) -> Path:
    """Write the bundle into ``artifacts/reference/`` and list it in the manifest."""
    manifest, paths, ref, stages = reference_side(artifacts, checkpoint, images, max_images)
    folder = manifest.folder / REFERENCE_DIR
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    arrays, names = {}, []
    for i, path in enumerate(paths):
        image = ref.preprocess([path])[0]
        _, ids = ref.prompts.request_ids(PROMPT, [image.num_tokens])
        for name, feeds in stage_feeds(stages, image, ids, window=WINDOW).items():
            if name in manifest.stages:
                arrays |= {array_key(i, name, "in", k): v.numpy() for k, v in feeds.items()}
                want = stages(name, feeds)
                arrays |= {array_key(i, name, "out", k): v.numpy() for k, v in want.items()}
        names.append(f"images/{i}-{Path(path).name}")
        shutil.copyfile(path, folder / names[-1])
    greedy = [ref.generate([p], PROMPT, max_new_tokens=tokens).token_ids for p in paths]
    np.savez(folder / ARRAYS, **arrays)
    info = {"prompt": PROMPT, "images": names, "tokens": greedy, "max_new_tokens": tokens}
    (folder / INFO).write_text(json.dumps(info | {"decoder_window": WINDOW}, indent=2))
    files = manifest.data.setdefault("files", {})
    for label in [k for k in files if k.startswith("reference.")]:
        del files[label]
    files["reference.arrays"] = file_entry(manifest.folder, folder / ARRAYS)
    files["reference.info"] = file_entry(manifest.folder, folder / INFO)
    for i, name in enumerate(names):
        files[image_label(i)] = file_entry(manifest.folder, folder / name)
    manifest.save()
    return folder
