"""Work a conversation does not need to repeat: an image's features, keyed by its content, and
the KV cache of a prompt that the next turn's prompt extends.

A follow-up question about the same image re-sends the image and the whole history; without
reuse it pays preprocessing, the vision encoder and a prefill over every image token again. The
``FeatureCache`` keeps packed image features (LRU, bounded in bytes); the ``PrefixCache`` keeps a
few decoders whose caches hold earlier sequences, and hands out the one sharing the longest
prefix with a new prompt, which then runs only the positions after it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.generate import Decoder


def content_key(source) -> str:
    """A hash of an image's content: encoded bytes, a file's bytes, or an array's pixels."""
    digest = hashlib.sha256()
    if isinstance(source, bytes | bytearray | memoryview):
        digest.update(bytes(source))
    elif isinstance(source, str | Path):
        digest.update(Path(source).read_bytes())
    else:
        pixels = np.asarray(source)
        digest.update(f"{pixels.shape}{pixels.dtype}".encode())
        digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Packed image features (num_tokens, D) by content key, least recently used dropped first
    once their bytes pass ``max_bytes``."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self.nbytes = 0  # of the arrays held
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self.lock:
            found = self.entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: str, features: np.ndarray) -> None:
        with self.lock:
            if key in self.entries:
                self.nbytes -= self.entries.pop(key).nbytes
            self.entries[key] = features
            self.nbytes += features.nbytes
            while len(self.entries) > 1 and self.nbytes > self.max_bytes:
                self.nbytes -= self.entries.popitem(last=False)[1].nbytes


def common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class PrefixCache:
    """Up to ``max_sequences`` decoders, each with the keys of the positions its cache holds
    (token ids; an image token's key names its image and place). ``take`` removes the entry it
    returns, so one decoder serves one request at a time; ``put`` returns it afterwards."""

    max_sequences: int = 4
    entries: list[tuple[list[Hashable], Decoder]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, keys: Sequence[Hashable], need: int) -> tuple[Decoder | None, int]:
        """The decoder sharing the longest prefix with ``keys`` (room for ``need`` positions)
        and that prefix's length, kept one short of ``keys`` so the prompt's last position runs
        and gives the next token's logits. ``(None, 0)`` when none shares anything."""
        with self.lock:
            best, best_len = None, 0
            for i, (held, decoder) in enumerate(self.entries):
                n = min(common_prefix(held, keys), len(keys) - 1)
                if n > best_len and decoder.capacity >= need:
                    best, best_len = i, n
            if best is None:
                return None, 0
            return self.entries.pop(best)[1], best_len

    def put(self, keys: Sequence[Hashable], decoder: Decoder) -> None:
        """Keep ``decoder`` whose cache holds the positions named by ``keys`` (newest first)."""
        with self.lock:
            self.entries.insert(0, (list(keys[: decoder.length]), decoder))
            del self.entries[self.max_sequences :]


@dataclass
class Reuse:
    """What ``FilaPipeline.generate`` may reuse across calls (``None`` for either: not that)."""

    features: FeatureCache | None = field(default_factory=FeatureCache)
    prefixes: PrefixCache | None = field(default_factory=PrefixCache)


def position_keys(
    ids: Sequence[int], image_token: int, image_keys: Sequence[str], counts: Sequence[int]
) -> list[Hashable]:
    """One key per prompt position: the token id, or for an image token (image key, its index
    within that image; ``counts``: each image's tokens), so two prompts share a prefix only
    where the same image sits."""
    keys: list[Hashable] = []
    image, index = 0, 0
    for token in ids:
        if token != image_token:
            keys.append(int(token))
            continue
        if index == counts[image]:
            image, index = image + 1, 0
        keys.append((image_keys[image], index))
        index += 1
    return keys
