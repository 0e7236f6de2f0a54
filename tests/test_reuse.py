"""The caches behind conversation reuse: content keys, the byte-bounded feature LRU, prefix
matching that names images by content, and decoder extension equal to one prefill."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.pipeline import FilaPipeline
from runtime.reuse import FeatureCache, PrefixCache, content_key, position_keys

pytestmark = pytest.mark.board


def test_content_key_follows_the_bytes_not_the_object(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"\x89PNG same")
    assert content_key(path) == content_key(b"\x89PNG same") != content_key(b"\x89PNG other")
    a = np.zeros((4, 4, 3), np.uint8)
    assert content_key(a) == content_key(a.copy()) != content_key(a.reshape(4, 12))


def test_feature_cache_drops_least_recently_used_past_its_bytes():
    cache = FeatureCache(max_bytes=3 * 400)
    for key in "abc":
        cache.put(key, np.zeros(100, np.float32))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", np.zeros(100, np.float32))
    assert cache.get("b") is None and cache.get("a") is not None and cache.nbytes <= 1200


def test_position_keys_name_each_image_by_content_and_place():
    image = 9
    one = position_keys([1, 9, 9, 2, 9, 3], image, ["A", "B"], [2, 1])
    assert one == [1, ("A", 0), ("A", 1), 2, ("B", 0), 3]
    other = position_keys([1, 9, 9, 2, 9, 3], image, ["A", "C"], [2, 1])
    assert other[:4] == one[:4] and other[4] != one[4]


class FakeDecoder:
    def __init__(self, length: int, capacity: int) -> None:
        self.length, self.capacity = length, capacity


def test_prefix_cache_hands_out_the_longest_shared_prefix_once():
    cache = PrefixCache(max_sequences=2)
    short, long = FakeDecoder(3, 100), FakeDecoder(5, 100)
    cache.put([1, 2, 3], short)
    cache.put([1, 2, 3, 4, 5], long)
    decoder, n = cache.take([1, 2, 3, 4, 9, 9], need=10)
    assert decoder is long and n == 4
    assert cache.take([1, 2, 3, 4, 9, 9], need=10) == (short, 3)  # the first was taken
    cache.put([1, 2], FakeDecoder(2, 5))
    assert cache.take([1, 2, 7], need=50) == (None, 0)  # too small for the request
    cache.put([5, 6], FakeDecoder(2, 100))
    assert cache.take([5, 6], need=4)[1] == 1  # the last position always runs (its logits)


@pytest.mark.parametrize("decoder", ["gqa", "portable"])
def test_extending_a_truncated_cache_equals_one_prefill(tiny_artifacts, decoder):
    pipe = FilaPipeline.from_artifacts(tiny_artifacts, decoder=decoder)
    dim = pipe.embed(np.zeros((1, 1), np.int64)).shape[-1]
    embeds = np.random.default_rng(0).standard_normal((1, 40, dim)).astype(np.float32)
    whole = pipe.new_decoder(64)
    expected = whole.prefill(embeds, np.ones((1, 40), np.int64)).copy()
    reused = pipe.new_decoder(64)
    reused.prefill(embeds[:, :25], np.ones((1, 25), np.int64))
    reused.decode_one_token(embeds[:, 7:8])  # a position the next prompt does not share
    reused.truncate(25)
    np.testing.assert_allclose(reused.extend(embeds[:, 25:]), expected, rtol=1e-5, atol=1e-5)
    changed = pipe.new_decoder(64)
    changed.prefill(embeds[:, :25] * 1.01, np.ones((1, 25), np.int64))
    assert not np.allclose(changed.extend(embeds[:, 25:]), expected, atol=1e-5)
