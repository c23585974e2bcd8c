"""PSP on ILSVRC2012 (ImageNet) with ResNet-18, -34 or -50.

Trains an ImageNet ResNet wrapped in `keras_psp.PSP` with the usual recipe
(SGD, momentum 0.9, learning rate 0.1 for batch 256, ×0.1 after epochs 30,
60 and 80 of 90, or a cosine schedule with warm-up; weight decay 1e-4 on
the kernels) and the standard preprocessing (training: random resized crop
to 224 + horizontal flip; evaluation: resize to 256 + central 224 crop;
ImageNet mean/std normalization); then slims, exports a verified SavedModel
and writes `results.json` (see examples/_paper.py for the output folder).
ResNet-18/34 are `keras_psp.models.imagenet_resnet`, ResNet-50 is
`keras.applications.ResNet50(weights=None)`; top-1 and top-5 accuracy are
reported on the validation split.

ILSVRC2012 needs a manual download (tensorflow-datasets "imagenet2012"):
register at https://image-net.org, download ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar into --manual-dir (default
<data-dir>/downloads/manual/, data-dir defaulting to ~/tensorflow_datasets);
the first run then prepares the dataset in --data-dir (hours; ~150 GB).

    python examples/imagenet_resnet.py --arch resnet50 --data-dir /data/tfds \\
        --manual-dir /data/imagenet-tars --out runs/r50_channel
    python examples/imagenet_resnet.py --arch resnet18 --schedule cosine --warmup-epochs 5 \\
        --batch-size 1024 --lr 0.4 --multiple-of 8

Runs resume from --out/backup. `--distribution` trains on several devices or
machines (README, "Distributed training"): `mirrored` (this machine's GPUs),
`multi_worker` (TF_CONFIG in every worker), `jax` (KERAS_BACKEND=jax, one
process per machine with --coordinator/--num-processes/--process-id);
--batch-size is the global batch.

    KERAS_BACKEND=jax python examples/imagenet_resnet.py --distribution jax \
        --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0 --out /shared/r50
"""

from __future__ import annotations

import _data
import _paper
import keras

from keras_psp.models import imagenet_resnet

STRUCTURES = ("channel", "column")
ARCHS = ("resnet18", "resnet34", "resnet50")


def parse_args(argv=None):
    p = _paper.parser(__doc__, STRUCTURES, structure="channel", epochs=90, batch_size=256,
                      lr=0.1, weight_decay=1e-4, schedule="step", milestones="0.3333,0.6667,0.8889",
                      manual_dir=True, out="runs/imagenet_resnet")
    m = p.add_argument_group("model")
    m.add_argument("--arch", choices=ARCHS, default="resnet50")
    m.add_argument("--width", type=int, default=64,
                   help="filters of the first stage of ResNet-18/34 (doubling per stage)")
    m.add_argument("--image-size", type=int, default=224,
                   help="training and evaluation crop size (evaluation resizes to size·256/224)")
    _paper.add_distribution_flags(p)
    args = p.parse_args(argv)
    if args.image_size < 32:
        p.error(f"--image-size must be at least 32, got {args.image_size}.")
    if args.arch == "resnet50" and args.width != 64:
        p.error("--width applies to resnet18 and resnet34; ResNet-50 is keras.applications'.")
    return args


def build_model(args, num_classes: int = 1000) -> keras.Model:
    shape = (args.image_size, args.image_size, 3)
    if args.arch == "resnet50":
        model = keras.applications.ResNet50(weights=None, input_shape=shape, classes=num_classes)
    else:
        w = args.width
        model = imagenet_resnet(int(args.arch[6:]), (w, 2 * w, 4 * w, 8 * w), input_shape=shape,
                                num_classes=num_classes, weight_decay=0)
    return _paper.with_kernel_decay(model, args.weight_decay)


def main(argv=None, callbacks=()) -> dict:
    """Runs the example; `callbacks` are extra Keras callbacks for `fit`."""
    args = parse_args(argv)
    strategy = _paper.setup_distribution(args)  # first: before anything runs
    keras.utils.set_random_seed(args.seed)
    data = _data.imagenet(args.batch_size, args.image_size, args.data_dir, args.manual_dir,
                          args.train_limit, args.eval_limit, args.steps_per_epoch, args.seed)

    def metrics():
        return ["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5")]

    return _paper.train_prune_export(args, build_model(args, data.num_classes), data,
                                     metrics=metrics, callbacks=callbacks,
                                     example="imagenet_resnet", strategy=strategy)


if __name__ == "__main__":
    main()
