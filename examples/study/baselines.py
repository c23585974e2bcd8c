"""The ℓ1-norm filter criterion (Li et al. 2017) and BN-scale network slimming
(Liu et al. 2017), pruned to a FLOPs target and fine-tuned.

Both prune the *inner* channels of each residual block (the filters of its
first convolution, `s{i}b{j}a_conv`, hence its BN channels and the second
convolution's input channels), as both papers do for ResNets: the block
outputs are tied together by the residual additions. The pruning goes
through keras_psp's own surgery: the trained plain model is wrapped with
`channel` structures on each block's second convolution, α is set to 0 on
the chosen input channels and 1 elsewhere, and `keras_psp.slim` removes the
channels physically (the first convolution's filters, their BN channels,
the second convolution's inputs), so the FLOPs are exact. How many channels
go is searched so that `count_flops(slim)` lands closest to the target:

- ℓ1-norm: the same fraction of every block (Li et al.'s uniform variant,
  without their per-layer sensitivity analysis), smallest Σ|W| of the
  first convolution's filter first;
- network slimming: one global ranking of |γ| over all inner BN layers,
  after training with L1 on those γ.

At least one channel per block stays.
"""

from __future__ import annotations

import re
import warnings

import keras
import numpy as np

import keras_psp

from .common import Config, Data, accuracy, build_resnet, compile_sgd, costs, fit

_FIRST = re.compile(r"^(s\d+b\d+)a_conv$")


def blocks(model: keras.Model) -> list[str]:
    """The block prefixes (`s1b1`, ...) of the ResNet, in order."""
    return [m.group(1) for layer in model.layers if (m := _FIRST.match(layer.name))]


def l1norm_scores(model: keras.Model) -> dict[str, np.ndarray]:
    """Σ|W| of each filter of every block's first convolution."""
    return {b: np.abs(keras.ops.convert_to_numpy(model.get_layer(f"{b}a_conv").kernel)
                      ).sum(axis=(0, 1, 2)) for b in blocks(model)}


def gamma_scores(model: keras.Model) -> dict[str, np.ndarray]:
    """|γ| of every block's first BatchNormalization."""
    return {b: np.abs(keras.ops.convert_to_numpy(model.get_layer(f"{b}a_bn").gamma))
            for b in blocks(model)}


def _uniform_cuts(scores: dict[str, np.ndarray], k: int, top: int) -> dict[str, np.ndarray]:
    """Cut floor(k × n / top) lowest-scored channels of each block (n its width)."""
    cuts = {}
    for b, s in scores.items():
        count = min(len(s) - 1, k * len(s) // top)
        cut = np.zeros(len(s), bool)
        cut[np.argsort(s, kind="stable")[:count]] = True
        cuts[b] = cut
    return cuts


def _global_cuts(scores: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Cut the k lowest scores over all blocks, keeping one channel per block."""
    order = sorted((float(v), b, i) for b, s in scores.items() for i, v in enumerate(s))
    cuts = {b: np.zeros(len(s), bool) for b, s in scores.items()}
    left = {b: len(s) for b, s in scores.items()}
    done = 0
    for _, b, i in order:
        if done == k:
            break
        if left[b] > 1:
            cuts[b][i], left[b], done = True, left[b] - 1, done + 1
    return cuts


def prune_to_target(plain: keras.Model, scores: dict[str, np.ndarray], rule: str,
                    target: float, check_inputs) -> tuple[keras.Model, dict]:
    """Slim `plain` with the `rule` ("uniform"/"global") cut whose FLOPs are closest to `target`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = keras_psp.wrap(plain, "channel", layers=[f"{b}b_conv" for b in scores])
    full = keras_psp.count_flops(plain)
    top = max(len(s) for s in scores.values())
    high = top if rule == "uniform" else sum(len(s) for s in scores.values())

    def cuts_for(k):
        return _uniform_cuts(scores, k, top) if rule == "uniform" else _global_cuts(scores, k)

    def apply(k) -> float:
        for b, cut in cuts_for(k).items():
            wrapped.get_layer(f"{b}b_conv").alpha.assign((~cut).astype("float32"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return keras_psp.count_flops(keras_psp.slim(wrapped)) / full

    low, up = 0, high  # FLOPs fall as k grows: find the last k above the target
    while up - low > 1:
        mid = (low + up) // 2
        low, up = (mid, up) if apply(mid) >= target else (low, mid)
    k = min((low, up), key=lambda c: abs(apply(c) - target))
    apply(k)
    small = keras_psp.slim(wrapped, check_inputs=check_inputs)
    kept = {b: int((~c).sum()) for b, c in cuts_for(k).items()}
    return small, {"kept_channels": kept, "flops_fraction": keras_psp.count_flops(small) / full}


def finetune(small: keras.Model, config: Config, data: Data, seed: int) -> float:
    """Fine-tunes the slim model (SGD, cosine from finetune_lr); returns seconds."""
    compile_sgd(small, config, data, config.finetune_lr, config.finetune_epochs)
    return fit(small, config, data, config.finetune_epochs, seed)


def pruned_row(method: str, plain, scores, rule, target, config, data, seed) -> tuple:
    """Prune to the target, measure, fine-tune, measure again."""
    small, info = prune_to_target(plain, scores, rule, target, data.x_test[:64])
    before = accuracy(small, data)
    seconds = finetune(small, config, data, seed) if config.finetune_epochs else 0.0
    row = {"method": method, "target": target, "seed": seed, "accuracy": accuracy(small, data),
           "accuracy_before_finetune": before, "finetune_seconds": seconds, **costs(small),
           **info}
    return row, small


def bn_l1_strength(config: Config, data: Data) -> float:
    """L1 strength on γ: the L1 drift alone, momentum included, would move γ by 1.5.

    Liu et al. use 1e-4 over 160 CIFAR epochs (lr 0.1, ÷10 at 50 % and 75 %,
    momentum 0.9): a drift of about 6.6. On our far shorter runs the same
    1e-4 would barely move γ from its initial 1, so the strength is scaled to
    the run: λ = 1.5 (1 − μ) / Σ_t η_t, with the cosine schedule's Σ_t η_t =
    lr × steps / 2, at most 1e-2 (smoke runs of a few steps).
    """
    if config.bn_l1 is not None:
        return config.bn_l1
    steps = config.epochs * -(-len(data.x_train) // config.batch_size)
    return min(1e-2, 1.5 * (1 - 0.9) / (config.lr * steps / 2))


def train_bn_slimming(config: Config, data: Data, seed: int) -> tuple[keras.Model, dict]:
    """Trains the ResNet with L1 on the inner BN γ; returns the plain trained model."""
    base = build_resnet(config, seed)
    strength = bn_l1_strength(config, data)
    inner = {f"{b}a_bn" for b in blocks(base)}

    def clone(layer):
        extra = {"gamma_regularizer": keras.regularizers.L1(strength)} if layer.name in inner else {}
        return layer.__class__.from_config({**layer.get_config(), **extra})

    model = keras.models.clone_model(base, clone_function=clone)
    model.set_weights(base.get_weights())
    compile_sgd(model, config, data, config.lr, config.epochs)
    seconds = fit(model, config, data, config.epochs, seed)
    plain = build_resnet(config, seed)  # the same graph, without the γ regularizer
    plain.set_weights(model.get_weights())
    return plain, {"bn_l1": strength, "train_seconds": seconds,
                   "accuracy_unpruned": accuracy(plain, data)}
