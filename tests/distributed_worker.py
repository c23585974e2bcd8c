"""One process of the multi-process tests (tests/test_distributed_*.py).

    python distributed_worker.py CONFIG_JSON

`CONFIG_JSON` (a dict): `engine` ("jax": `keras_psp.distributed.initialize`
+ DataParallel + fit; "multi_worker": MultiWorkerMirroredStrategy +
`keras_psp.distributed.train`; "mirrored": MirroredStrategy over two logical
CPUs, `train` and `fit` side by side; "reference": one process, plain `fit`
on the same global batches), `backend`, `index`, `count`, `address` (JAX
coordinator) or `ports` (TF workers), `policies`, `epochs`, `batch` (per
process), `steps` (per epoch), `out` (this process's folder), `backup` (a
shared BackupAndRestore folder or None), `kill` ([process, epoch]: that
process SIGKILLs itself at step 1 of that epoch), `result` (JSON written at
the end). Every process gets different data: process i reads examples
[i·n, (i+1)·n); the reference interleaves them into the same global batches.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def setup(config):
    os.environ["KERAS_BACKEND"] = config["backend"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    engine = config["engine"]
    if engine == "multi_worker":
        os.environ["TF_CONFIG"] = json.dumps({
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in config["ports"]]},
            "task": {"type": "worker", "index": config["index"]}})
        import tensorflow as tf

        return tf.distribute.MultiWorkerMirroredStrategy()
    if engine == "mirrored":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    if engine == "jax":
        import keras_psp

        keras_psp.distributed.initialize(config["address"], config["count"], config["index"],
                                         heartbeat_timeout=10, initialization_timeout=120)
    return None


def data(config):
    import numpy as np

    from helpers import load_digits

    (x, y), _ = load_digits()
    n = config["batch"] * config["steps"]
    parts = [(x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]) for i in range(config["count"])]
    if config["engine"] in ("jax", "multi_worker"):
        return parts[config["index"]]
    b = config["batch"]  # global batch k: every process's batch k, in process order
    return tuple(np.concatenate([p[j][k * b:(k + 1) * b] for k in range(config["steps"])
                                 for p in parts]) for j in (0, 1))


def build(config, sync_bn: bool):
    import keras
    from keras import layers as L

    import keras_psp

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = inputs
    for i, width in enumerate((8, 16)):
        h = L.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(h)
        h = L.BatchNormalization(synchronized=sync_bn, name=f"bn{i}")(h)
        h = L.ReLU()(h)
    h = L.GlobalAveragePooling2D()(h)
    outputs = L.Dense(10, activation="softmax", name="head", dtype="float32")(h)
    model = keras_psp.wrap(keras.Model(inputs, outputs), strength=config.get("strength", 0.01))
    model.compile(keras.optimizers.SGD(config.get("lr", 0.05), momentum=0.9),
                  "sparse_categorical_crossentropy")
    return model


def callbacks(config, policy, model, record):
    import keras
    import numpy as np

    import keras_psp
    from keras_psp.budget import set_strength
    from keras_psp.cloning import psp_layers

    out = os.path.join(config["out"], policy)
    tensorflow = config["backend"] == "tensorflow"

    def alphas():
        return {layer.name: np.ravel(keras.ops.convert_to_numpy(layer.alpha)).tolist()
                for layer in psp_layers(model)}

    class Probe(keras.callbacks.Callback):
        """Records α when training starts (after a restore) and after each
        epoch; raises the α strength and thresholds at epoch 1; SIGKILLs this
        process at step 1 of epoch `kill[1]` if it is process `kill[0]`."""

        def on_train_begin(self, logs=None):
            record["alpha_at_start"] = alphas()

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            if epoch == 1:  # as FlopsBudget: a new strength, new thresholds, a new trace
                set_strength(self.model, config.get("strength2", 0.03))
                for layer in psp_layers(self.model):
                    layer.threshold = 0.3
                self.model.make_train_function(force=True)

        def on_train_batch_begin(self, batch, logs=None):
            kill = config.get("kill")
            if kill and kill[0] == config["index"] and kill[1] == self.epoch and batch == 1:
                print("KILLING MYSELF", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        def on_epoch_end(self, epoch, logs=None):
            record.setdefault("alpha_by_epoch", {})[str(epoch + 1)] = alphas()
            with open(config["result"] + f".epoch{epoch + 1}", "w") as f:
                json.dump(alphas(), f)

    monitor = keras_psp.SeparationMonitor(every_n_steps=2, verbose=0,
                                          log_dir=os.path.join(out, "tb") if tensorflow else None)
    extra = []
    if config.get("backup"):
        extra.append(keras_psp.distributed.BackupAndRestore(os.path.join(config["backup"], policy)))
    if config.get("budget"):
        extra.append(keras_psp.FlopsBudget(target=0.5, checks_per_epoch=2, verbose=0))
    log = keras_psp.distributed.ChiefOnly(keras.callbacks.CSVLogger(os.path.join(out, "log.csv")))
    return monitor, [*extra, Probe(), monitor, log]


def mirrored_checks(model, x) -> dict:
    """What MirroredStrategy made of the α: one copy per replica, equal after
    `fit`; and the stripped model computes what the PSP model computes, both
    called directly and through `predict` split over the replicas."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_psp import strip
    from keras_psp.cloning import psp_layers

    mirrored = psp_layers(model)[-1].alpha.value  # the backend variable behind keras.Variable
    replicas = [np.array(v.numpy()) for v in getattr(mirrored, "values", ())]
    plain = strip(model)
    direct = np.asarray(model(x, training=False))
    return {
        "distributed": isinstance(mirrored, tf.distribute.DistributedValues),
        "replicas": len(replicas),
        "replica_diff": float(np.max(np.abs(replicas[0] - replicas[-1]))) if replicas else None,
        "strip_diff": float(np.max(np.abs(np.asarray(plain(x, training=False)) - direct))),
        "predict_diff": float(np.max(np.abs(model.predict(x, verbose=0)
                                            - np.asarray(plain(x, training=False))))),
        "finite": bool(all(np.all(np.isfinite(keras.ops.convert_to_numpy(layer.alpha)))
                           for layer in psp_layers(model))),
    }


def run(config, strategy, policy) -> dict:
    import contextlib

    import keras
    import numpy as np

    import keras_psp
    from keras_psp.cloning import psp_layers

    keras.config.set_dtype_policy(policy)
    engine, record = config["engine"], {}
    if engine == "jax":
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(auto_shard_dataset=False))
    os.makedirs(os.path.join(config["out"], policy), exist_ok=True)
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = build(config, sync_bn=config["backend"] == "tensorflow" and engine != "mirrored")
    x, y = data(config)
    monitor, cbs = callbacks(config, policy, model, record)
    kwargs = {"epochs": config["epochs"], "callbacks": cbs, "verbose": 0}
    if engine == "multi_worker":
        import tensorflow as tf

        b = config["batch"]

        def dataset_fn(context):  # this process's own examples, per-replica batches
            return tf.data.Dataset.from_tensor_slices((x, y)).batch(b)

        history = keras_psp.distributed.fit(model, dataset_fn, **kwargs)
    elif engine == "mirrored":  # train() and fit() under one strategy, side by side
        import tensorflow as tf

        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(2 * config["batch"])
        history = keras_psp.distributed.train(model, dataset, **kwargs)
        with strategy.scope():
            twin = build(config, sync_bn=False)
        twin.fit(dataset, epochs=config["epochs"], verbose=0,
                 callbacks=callbacks(config, policy + "_fit", twin, record.setdefault("fit", {}))[1])
        record["fit"]["alpha"] = {layer.name: np.ravel(keras.ops.convert_to_numpy(layer.alpha))
                                  .tolist() for layer in psp_layers(twin)}
        record["fit"].update(mirrored_checks(twin, x[:64]))
    else:
        batch = config["batch"] * (config["count"] if engine == "reference" else 1)
        history = keras_psp.distributed.fit(model, x, y, batch_size=batch, shuffle=False,
                                            **kwargs)
    if engine == "jax":
        keras.distribution.set_distribution(None)  # trained: data stays in this process
    local = keras_psp.distributed.local_copy(model)
    # bf16 rounds to ~4e-3: slim's default check (1e-4 of the largest output) is for float32
    small = keras_psp.slim(local, check_inputs=x[:32])  # atol from the dtype policy
    record.update({
        "alpha": {layer.name: np.ravel(keras.ops.convert_to_numpy(layer.alpha)).tolist()
                  for layer in psp_layers(model)},
        "masks": {layer.name: np.ravel(layer.mask()).tolist() for layer in psp_layers(model)},
        "monitor": monitor.history, "monitor_steps": monitor.step_history,
        "loss": history.history["loss"],
        "slim": {"params": small.count_params(), "max_diff": keras_psp.verify(local, small, x[:32])},
        "files": sorted(os.path.relpath(os.path.join(d, f), config["out"])
                        for d, _, files in os.walk(os.path.join(config["out"], policy)) for f in files),
    })
    return record


def main():
    config = json.loads(sys.argv[1])
    strategy = setup(config)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    results = {policy: run(config, strategy, policy) for policy in config["policies"]}
    with open(config["result"], "w") as f:
        json.dump(results, f)
    print("WORKER-DONE", config["index"], flush=True)


if __name__ == "__main__":
    main()
