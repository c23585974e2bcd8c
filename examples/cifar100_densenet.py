"""PSP on CIFAR-100 with DenseNet-40 (k = 12) or DenseNet-BC.

Trains a CIFAR DenseNet (Huang et al. 2017) wrapped in `keras_psp.PSP`
with the paper's schedule (SGD, Nesterov momentum 0.9, learning rate 0.1,
×0.1 at 50 % and 75 % of 300 epochs, batch 64, weight decay 1e-4) and the
standard augmentation (pad 4 + random 32×32 crop + horizontal flip,
per-channel normalization); then slims, exports a verified SavedModel and
writes `results.json` (see examples/_paper.py for the output folder).

Structures:
  channel  one α per input channel of every convolution (default): each
           layer chooses which channels of the growing concatenation it
           reads, and slim takes just those (a gather) before it
  column   one α per kernel position × input channel

(Output-side structures, `filter` and `layer`, are left out: every
DenseNet convolution output only reaches BatchNormalizations, which cancel
such scales.)

    python examples/cifar100_densenet.py                       # DenseNet-40, k = 12
    python examples/cifar100_densenet.py --bc --depth 100      # DenseNet-BC-100, k = 12

CIFAR-100 comes from tensorflow-datasets: tfds downloads it into --data-dir
(default ~/tensorflow_datasets) on first use; offline, point --data-dir at a
folder where it was prepared before. Runs resume from --out/backup.
"""

from __future__ import annotations

import _data
import _paper
import keras

from keras_psp.models import densenet

STRUCTURES = ("channel", "column")


def parse_args(argv=None):
    p = _paper.parser(__doc__, STRUCTURES, structure="channel", epochs=300, batch_size=64,
                      lr=0.1, weight_decay=1e-4, schedule="step", nesterov=True,
                      out="runs/cifar100_densenet")
    m = p.add_argument_group("model")
    m.add_argument("--depth", type=int, default=40,
                   help="3n+4 (40...), or 6n+4 with --bc (100, 250...)")
    m.add_argument("--growth-rate", type=int, default=12, help="k")
    m.add_argument("--bc", action="store_true",
                   help="DenseNet-BC: bottleneck layers and compression")
    m.add_argument("--compression", type=float, default=None,
                   help="fraction of channels transitions keep (default 0.5 with --bc, else 1)")
    args = p.parse_args(argv)
    if args.compression is None:
        args.compression = 0.5 if args.bc else 1.0
    per_layer = 6 if args.bc else 3
    if (args.depth - 4) % per_layer or args.depth < 4 + per_layer:
        p.error(f"--depth must be {per_layer}n + 4{' with --bc' if args.bc else ''}, "
                f"got {args.depth}.")
    return args


def build_model(args, num_classes: int = 100) -> keras.Model:
    model = densenet(args.depth, args.growth_rate, bottleneck=args.bc,
                     compression=args.compression, num_classes=num_classes, weight_decay=0)
    return _paper.with_kernel_decay(model, args.weight_decay)


def main(argv=None, callbacks=()) -> dict:
    """Runs the example; `callbacks` are extra Keras callbacks for `fit`."""
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    data = _data.cifar("cifar100", args.batch_size, args.data_dir, args.train_limit,
                       args.eval_limit, args.steps_per_epoch, args.seed)
    return _paper.train_prune_export(args, build_model(args, data.num_classes), data,
                                     callbacks=callbacks, example="cifar100_densenet")


if __name__ == "__main__":
    main()
