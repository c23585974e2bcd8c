"""PSP on CIFAR-10 with ResNet-20/56/110 (the paper's Figure 3 setting).

Trains a CIFAR ResNet (He et al. 2016) wrapped in `keras_psp.PSP` with SGD
(momentum 0.9, learning rate 0.1, ×0.1 at 50 % and 75 % of the epochs or a
cosine schedule, weight decay 1e-4 on the kernels, batch 128) and the
standard augmentation (pad 4 + random 32×32 crop + horizontal flip,
per-channel normalization); then slims, exports a verified SavedModel and
writes `results.json` (see examples/_paper.py for the output folder).

Structures:
  column   one α per kernel position × input channel of every convolution
  channel  one α per input channel (default)
  layer    one α per residual branch: pre-activation blocks, and only each
           branch's last convolution is wrapped (a BN right after a layer α
           would cancel it); a cut branch leaves the slim model

CIFAR-10 comes from tensorflow-datasets: tfds downloads it into --data-dir
(default ~/tensorflow_datasets) on first use; offline, point --data-dir at a
folder where it was prepared before. Runs resume from --out/backup.

    python examples/cifar10_resnet.py --depth 56 --structure column --out runs/r56_column
    python examples/cifar10_resnet.py --depth 20 --epochs 2 --train-limit 2048   # a quick look
"""

from __future__ import annotations

import re

import _data
import _paper
import keras

from keras_psp.models import cifar_resnet

STRUCTURES = ("column", "channel", "layer")
BRANCH_END = re.compile(r"s\d+b\d+b_conv")


def parse_args(argv=None):
    p = _paper.parser(__doc__, STRUCTURES, structure="channel", epochs=160, batch_size=128,
                      lr=0.1, weight_decay=1e-4, schedule="step", out="runs/cifar10_resnet")
    m = p.add_argument_group("model")
    m.add_argument("--depth", type=int, default=56, help="6n+2: 20, 56, 110...")
    m.add_argument("--widths", type=_paper.widths, default=(16, 32, 64),
                   help="filters of the 3 stages")
    m.add_argument("--block", choices=("basic", "preact"), default=None,
                   help="residual block; default: preact for --structure layer, else basic")
    args = p.parse_args(argv)
    args.block = args.block or ("preact" if args.structure == "layer" else "basic")
    if args.structure == "layer" and args.block != "preact":
        p.error("--structure layer needs --block preact: in basic blocks every convolution "
                "is followed by a BatchNormalization, which cancels a layer-wise α.")
    if (args.depth - 2) % 6 or args.depth < 8:
        p.error(f"--depth must be 6n + 2 (20, 56, 110...), got {args.depth}.")
    return args


def build_model(args, num_classes: int = 10) -> tuple[keras.Model, object]:
    """The plain ResNet and the `wrap` layer selector for `args.structure`."""
    model = cifar_resnet(args.depth, args.widths, num_classes=num_classes, weight_decay=0,
                         preactivation=args.block == "preact")
    model = _paper.with_kernel_decay(model, args.weight_decay)
    layers = None
    if args.structure == "layer":
        layers = [layer.name for layer in model.layers if BRANCH_END.fullmatch(layer.name)]
    return model, layers


def main(argv=None, callbacks=()) -> dict:
    """Runs the example; `callbacks` are extra Keras callbacks for `fit`."""
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    data = _data.cifar("cifar10", args.batch_size, args.data_dir, args.train_limit,
                       args.eval_limit, args.steps_per_epoch, args.seed)
    model, layers = build_model(args, data.num_classes)
    return _paper.train_prune_export(args, model, data, layers=layers, callbacks=callbacks,
                                     example="cifar10_resnet")


if __name__ == "__main__":
    main()
