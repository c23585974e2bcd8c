"""Input pipelines of the paper examples: CIFAR-10/100 and ILSVRC2012 via tfds.

Every pipeline reads a `tensorflow-datasets` split (`tfds.load` with
`data_dir`) and is a `tf.data` pipeline ending in `.prefetch(AUTOTUNE)`:
training data shuffled, repeated and augmented, evaluation data one ordered
pass. Images are normalized per channel in the pipeline, so the models (and
the exported files) take `(pixels / 255 - mean) / std`; `Data.preprocessing`
records the constants.

tfds downloads CIFAR by itself; ILSVRC2012 must be downloaded by hand (see
`imagenet`). Offline, point `data_dir` at a folder where the dataset was
prepared before. Tests use `tfds.testing.mock_data`, which needs no files.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf
import tensorflow_datasets as tfds

AUTOTUNE = tf.data.AUTOTUNE

#: Per-channel mean and standard deviation of the training images, in [0, 1].
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclasses.dataclass
class Data:
    """A dataset ready for `fit`.

    Attributes:
        name: The tfds name.
        train: Batched, shuffled, augmented training data, repeated forever.
        eval: Batched evaluation data, one pass.
        steps_per_epoch: Training steps per epoch.
        num_classes: Number of labels.
        train_examples, eval_examples: Examples in the splits used.
        preprocessing: What the models expect, for the results file.
    """

    name: str
    train: tf.data.Dataset
    eval: tf.data.Dataset
    steps_per_epoch: int
    num_classes: int
    train_examples: int
    eval_examples: int
    preprocessing: dict


def load_split(name, split, data_dir=None, limit=None, training=False, manual_dir=None,
               decoders=None) -> tuple[tf.data.Dataset, int]:
    """`(dataset of (image, label), number of examples)` of one tfds split.

    Args:
        name: tfds name ("cifar10", "imagenet2012"...).
        split: Split name ("train", "test", "validation").
        data_dir: tfds data folder; None: tfds's default (~/tensorflow_datasets).
        limit: Keep only the first `limit` examples.
        training: Shuffle the files.
        manual_dir: Folder of manually downloaded archives (ILSVRC2012).
        decoders: tfds decoders, e.g. `{"image": tfds.decode.SkipDecoding()}`.
    """
    kwargs = {}
    if manual_dir:
        kwargs["download_and_prepare_kwargs"] = {
            "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)
        }
    ds, info = tfds.load(name, split=split, data_dir=data_dir, as_supervised=True,
                         shuffle_files=training, decoders=decoders, with_info=True, **kwargs)
    if limit:
        ds = ds.take(limit)
    count = int(ds.cardinality())
    if count < 0:  # unknown: ask the metadata
        count = info.splits[split].num_examples if not limit else min(
            limit, info.splits[split].num_examples)
    if count == 0:
        raise ValueError(f"The {name} split '{split}' is empty; check --data-dir and the limits.")
    return ds, count


def _normalize(image, stats):
    mean, std = (tf.constant(v, tf.float32) for v in stats)
    return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def batched(ds, count, batch_size, training, preprocess, seed=None, cache=False,
            shuffle_buffer=50_000) -> tf.data.Dataset:
    """Caches, shuffles + repeats (training), maps `preprocess`, batches, prefetches."""
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(min(count, shuffle_buffer), seed=seed, reshuffle_each_iteration=True)
        ds = ds.repeat()
    ds = ds.map(preprocess, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=training, num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def steps(count, batch_size, steps_per_epoch=None) -> int:
    """Steps per epoch: `steps_per_epoch`, else full batches of the split."""
    return steps_per_epoch or max(1, count // batch_size)


def cifar(name, batch_size, data_dir=None, train_limit=None, eval_limit=None,
          steps_per_epoch=None, seed=None) -> Data:
    """CIFAR-10 or CIFAR-100 ("cifar10" / "cifar100") with the standard augmentation.

    Training: zero-pad 4 pixels, random 32×32 crop, random horizontal flip;
    then (both splits) per-channel normalization. The decoded training split
    is cached in memory (150 MB).
    """
    stats = CIFAR_STATS[name]

    def augment(image, label):
        image = tf.image.pad_to_bounding_box(image, 4, 4, 40, 40)
        image = tf.image.random_crop(image, (32, 32, 3))
        image = tf.image.random_flip_left_right(image)
        return _normalize(image, stats), label

    def plain(image, label):
        return _normalize(image, stats), label

    train, n_train = load_split(name, "train", data_dir, train_limit, training=True)
    test, n_test = load_split(name, "test", data_dir, eval_limit)
    return Data(
        name=name,
        train=batched(train, n_train, batch_size, True, augment, seed, cache=True),
        eval=batched(test, n_test, batch_size, False, plain),
        steps_per_epoch=steps(n_train, batch_size, steps_per_epoch),
        num_classes=10 if name == "cifar10" else 100,
        train_examples=n_train,
        eval_examples=n_test,
        preprocessing={"input": "RGB 32x32", "mean": stats[0], "std": stats[1],
                       "formula": "(pixels / 255 - mean) / std"},
    )


def _random_resized_crop(encoded, size):
    """Inception-style crop (8-100 % of the area, aspect 3/4-4/3), decoded, resized."""
    begin, crop, _ = tf.image.sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(encoded),
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=(1, 1, 4)),
        min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
    image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    return tf.image.resize(image, (size, size), antialias=True)


def _resize_center_crop(encoded, size):
    """Shorter side to `size · 256 / 224`, then the central `size × size`."""
    image = tf.io.decode_jpeg(encoded, channels=3)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = math.ceil(size * 256 / 224) / tf.reduce_min(shape)
    resized = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, resized, antialias=True)
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    return tf.image.crop_to_bounding_box(image, top, left, size, size)


def imagenet(batch_size, image_size=224, data_dir=None, manual_dir=None, train_limit=None,
             eval_limit=None, steps_per_epoch=None, seed=None) -> Data:
    """ILSVRC2012 (tfds "imagenet2012") with the standard preprocessing.

    Training: random resized crop to `image_size` (decoded straight from the
    crop window) and random horizontal flip; evaluation (the "validation"
    split): shorter side to `image_size · 256/224`, central crop. Both are
    normalized with the usual ImageNet mean and std.

    tfds cannot download ILSVRC2012: download `ILSVRC2012_img_train.tar` and
    `ILSVRC2012_img_val.tar` from https://image-net.org (registration needed)
    into `manual_dir` (default `<data_dir>/downloads/manual/`); the first run
    then prepares the dataset in `data_dir` (hours, ~150 GB).
    """
    skip = {"image": tfds.decode.SkipDecoding()}  # decode in the map: crop first
    train, n_train = load_split("imagenet2012", "train", data_dir, train_limit, True,
                                manual_dir, skip)
    val, n_val = load_split("imagenet2012", "validation", data_dir, eval_limit, False,
                            manual_dir, skip)

    def augment(encoded, label):
        image = tf.image.random_flip_left_right(_random_resized_crop(encoded, image_size))
        return _normalize(image, IMAGENET_STATS), label

    def plain(encoded, label):
        return _normalize(_resize_center_crop(encoded, image_size), IMAGENET_STATS), label

    return Data(
        name="imagenet2012",
        train=batched(train, n_train, batch_size, True, augment, seed, shuffle_buffer=10_000),
        eval=batched(val, n_val, batch_size, False, plain),
        steps_per_epoch=steps(n_train, batch_size, steps_per_epoch),
        num_classes=1000,
        train_examples=n_train,
        eval_examples=n_val,
        preprocessing={"input": f"RGB {image_size}x{image_size}", "mean": IMAGENET_STATS[0],
                       "std": IMAGENET_STATS[1], "formula": "(pixels / 255 - mean) / std"},
    )
