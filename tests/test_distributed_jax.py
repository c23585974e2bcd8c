"""PSP across two JAX processes: `keras.distribution.DataParallel` and plain `fit`.

Two processes on 127.0.0.1 (`keras_psp.distributed.initialize`, gloo CPU
collectives), each with its own examples, train a PSP-wrapped CNN under
float32 and mixed_bfloat16; a third process trains the same model on the
same global batches alone. Run in the JAX pass of scripts/test.sh (the
workers set their backend themselves; running it twice would only cost time).
"""

import json

import keras
import numpy as np
import pytest

from multiprocess import check_ok, free_port, launch, max_diff

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax",
                                reason="multi-process JAX test: runs in the JAX pass")

POLICIES = ("float32", "mixed_bfloat16")
BASE = {"epochs": 3, "batch": 16, "steps": 4, "count": 2}
#: Largest |α| difference between distributed and single-process training after
#: 12 steps. Measured: float32 6e-8, mixed_bfloat16 7e-5 (bf16 rounding of
#: reductions done in another order). The same 12 steps at another α strength
#: (0.01 throughout instead of 0.03 from epoch 1) end 5.6e-2 apart.
TOLERANCE = {"float32": 1e-5, "mixed_bfloat16": 1e-3}
#: Largest difference of the slim model's outputs (softmax) from the PSP model's.
SLIM_TOLERANCE = {"float32": 1e-4, "mixed_bfloat16": 2e-2}


def _workers(tmp_path, **extra):
    address = f"127.0.0.1:{free_port()}"
    return [{**BASE, "engine": "jax", "index": i, "address": address,
             "out": str(tmp_path / f"p{i}"), **extra} for i in range(2)]


def test_two_processes_train_like_one(tmp_path):
    configs = _workers(tmp_path, policies=POLICIES)
    configs.append({**BASE, "engine": "reference", "index": 0, "policies": POLICIES,
                    "out": str(tmp_path / "reference")})
    finished = launch(configs, tmp_path, timeout=240, backend="jax")
    check_ok(finished)
    (p0, p1, reference) = (f.result for f in finished)
    for policy in POLICIES:
        a, b, ref = p0[policy], p1[policy], reference[policy]
        assert a["alpha"] == b["alpha"], policy  # exactly the same α in both processes
        assert a["masks"] == b["masks"]
        assert json.dumps(a["monitor"]) == json.dumps(b["monitor"])  # the monitor's figures
        assert json.dumps(a["monitor_steps"]) == json.dumps(b["monitor_steps"])
        assert len(a["monitor"]) == 3 and len(a["monitor_steps"]) == 6
        assert a["alpha"] != a["alpha_at_start"]  # trained
        assert max_diff(a["alpha"], ref["alpha"]) <= TOLERANCE[policy], policy
        np.testing.assert_allclose(a["loss"], ref["loss"], rtol=10 * TOLERANCE[policy])
        assert a["slim"]["max_diff"] <= SLIM_TOLERANCE[policy] and a["slim"]["params"] > 0
        # only process 0 writes (ChiefOnly(CSVLogger)); JAX writes no event file
        assert f"{policy}/log.csv" in a["files"] and b["files"] == [], b["files"]


def test_killed_process_fails_the_other_and_restart_resumes(tmp_path):
    backup = str(tmp_path / "backup")
    configs = _workers(tmp_path, policies=["float32"], backup=backup, budget=True, kill=[1, 2])
    finished = launch(configs, tmp_path, timeout=180, backend="jax")
    survivor, victim = finished
    assert victim.returncode == -9 and "KILLING MYSELF" in victim.output, victim.tail()
    assert survivor.returncode not in (0, None), survivor.tail()  # failed, did not hang
    delay = survivor.ended - victim.ended
    print(f"the survivor failed {delay:.1f} s after the kill")
    assert delay < 60, delay
    assert "lost contact with another training process" in survivor.output, survivor.tail()
    saved = json.loads((tmp_path / "result0.json.epoch2").read_text())

    restart = launch(_workers(tmp_path / "restart", policies=["float32"], backup=backup,
                              budget=True), _mkdir(tmp_path / "restart"), timeout=180,
                     backend="jax")
    check_ok(restart)
    first, second = (f.result["float32"] for f in restart)
    assert first["alpha_at_start"] == saved  # resumed with the α of the last backup
    assert sorted(first["alpha_by_epoch"]) == ["3"]  # only the epoch after it
    assert first["alpha"] == second["alpha"]


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path
