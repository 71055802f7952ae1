"""Stateless augmentation in the input pipeline: the same (seed, epoch, batch) gives the same
transforms in any process, each transform does what it says, and the result stays 0..255."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mlic import augment
from mlic.augment import Augmentation

OFF = Augmentation(flip=False, rotation=0.0, zoom=0.0, contrast=0.0)


def blocks(n: int = 4, size: int = 32) -> tf.Tensor:
    """Images holding one bright block off the centre (so flips and turns move it)."""
    x = np.zeros((n, size, size, 3), np.float32)
    x[:, 6:14, 4:10, :] = 200.0
    x[:, 20:24, 18:30, 1] = 90.0
    return tf.constant(x)


def seed(epoch: int = 0, batch: int = 0, base: int = 7) -> tf.Tensor:
    return augment.batch_seed(base, tf.constant(epoch), tf.constant(batch))


def test_the_same_seed_gives_the_same_batch_and_another_a_different_one() -> None:
    x, aug = blocks(), Augmentation(rotation=0.1, zoom=0.2, contrast=0.3)
    a = augment.augment_batch(x, seed(1, 2), aug).numpy()
    np.testing.assert_array_equal(a, augment.augment_batch(x, seed(1, 2), aug).numpy())
    for other in (seed(1, 3), seed(2, 2), seed(1, 2, base=8)):
        assert not np.array_equal(a, augment.augment_batch(x, other, aug).numpy())


def test_everything_off_is_the_identity() -> None:
    x = blocks()
    np.testing.assert_array_equal(augment.augment_batch(x, seed(), OFF).numpy(), x.numpy())
    assert not OFF.active and Augmentation().active


def test_flip_mirrors_some_images_left_right_and_leaves_the_others() -> None:
    x = blocks(16).numpy()
    out = augment.augment_batch(tf.constant(x), seed(), Augmentation(flip=True, rotation=0, zoom=0, contrast=0)).numpy()
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x)]
    kept = [np.array_equal(o, i) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_rotation_moves_the_block_about_the_centre_keeping_its_mass() -> None:
    x = np.zeros((8, 33, 33, 3), np.float32)
    x[:, 14:19, 14:19, :] = 255.0  # a centred block: turning keeps it inside and its mass
    x[:, 2:6, 14:19, :] = 255.0    # one above it, which a turn moves
    out = augment.augment_batch(tf.constant(x), seed(), dataclasses_replace(OFF, rotation=0.25)).numpy()
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), x.sum(axis=(1, 2, 3)), rtol=0.03)
    np.testing.assert_allclose(out[:, 16, 16], 255.0)  # the centre is a fixed point
    assert not np.array_equal(out, x)


def test_zoom_scales_the_block_about_the_centre() -> None:
    x = np.zeros((16, 33, 33, 3), np.float32)
    x[:, 12:21, 12:21, :] = 255.0
    out = augment.augment_batch(tf.constant(x), seed(), dataclasses_replace(OFF, zoom=0.3)).numpy()
    ratio = out.sum(axis=(1, 2, 3)) / x.sum(axis=(1, 2, 3))
    # area scales with zoom^2: between 0.7^2 and 1.3^2, some in, some out
    assert ((ratio > 0.45) & (ratio < 1.75)).all() and (ratio < 0.97).any() and (ratio > 1.03).any()


def test_contrast_keeps_each_image_mean_and_values_stay_in_range() -> None:
    x = 100.0 + blocks(8) * 0.25  # mid-range, so no pixel is clipped at 0 or 255
    out = augment.augment_batch(x, seed(), dataclasses_replace(OFF, contrast=0.5)).numpy()
    assert not np.allclose(out, x.numpy())
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), x.numpy().mean(axis=(1, 2, 3)), rtol=1e-4)
    strong = augment.augment_batch(x * 1.2, seed(), Augmentation(rotation=0.2, zoom=0.3, contrast=0.9)).numpy()
    assert strong.min() >= 0.0 and strong.max() <= 255.0


def test_colour_reorders_grays_or_inverts_each_image_and_nothing_else() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (64, 8, 8, 3)).astype(np.float32)
    aug = dataclasses_replace(OFF, colour=True)
    assert aug.active
    out = augment.augment_batch(tf.constant(x), seed(), aug).numpy()
    np.testing.assert_array_equal(out, augment.augment_batch(tf.constant(x), seed(), aug).numpy())
    kinds = []
    for o, i in zip(out, x):
        for inverted in (False, True):
            v = 255.0 - o if inverted else o
            orders = [p for p in augment._CHANNEL_ORDERS if np.allclose(v, i[..., list(p)], atol=1e-3)]
            gray = np.allclose(v, i.mean(axis=-1, keepdims=True), atol=1e-3)
            if orders or gray:
                kinds.append((inverted, "gray" if gray else orders[0]))
                break
        else:
            raise AssertionError("an image was changed into something other than a recolouring")
    # every kind happens on 64 images: inverted or not, gray or one of several channel orders
    assert {k[0] for k in kinds} == {False, True}
    assert "gray" in {k[1] for k in kinds} and len({k[1] for k in kinds if k[1] != "gray"}) >= 4
    assert sum(k[1] == "gray" for k in kinds) < 32 and sum(k[0] for k in kinds) < 32  # p = 0.2 each


@pytest.mark.parametrize("n", [1, 5])
def test_any_batch_size_and_a_dynamic_one(n: int) -> None:
    fn = tf.function(lambda images, s: augment.augment_batch(images, s, Augmentation(colour=True)),
                     input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32), tf.TensorSpec([2], tf.int64)])
    assert fn(blocks(n), seed()).shape == (n, 32, 32, 3)


def dataclasses_replace(aug: Augmentation, **changes) -> Augmentation:
    import dataclasses

    return dataclasses.replace(aug, **changes)
