"""Launching the processes of the multi-process tests, bounded in time.

Every process is a `distributed_worker.py` subprocess; `launch` waits for all
of them with one deadline and kills whatever is still running when it
returns or fails, so a hung collective never outlives a test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np

WORKER = pathlib.Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Finished:
    """How one process ended: exit status, output, when (monotonic seconds)."""

    returncode: int | None
    output: str
    ended: float
    result: dict | None

    def tail(self, n: int = 3000) -> str:
        return self.output[-n:]


def launch(configs: list[dict], folder: pathlib.Path, timeout: float,
           backend: str) -> list[Finished]:
    """Starts one worker per config (all at once), waits at most `timeout`
    seconds in all, and returns how each ended; a process still running at
    the deadline is killed and has `returncode` None."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONUNBUFFERED": "1"}
    env.pop("TF_CONFIG", None)
    procs, logs = [], []
    try:
        for i, config in enumerate(configs):
            config = {"backend": backend, "result": str(folder / f"result{i}.json"), **config}
            configs[i] = config
            log = open(folder / f"log{i}.txt", "w")  # noqa: SIM115 - closed in finally
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(config)],
                                          stdout=log, stderr=subprocess.STDOUT, env=env,
                                          cwd=WORKER.parent))
        deadline, ended = time.monotonic() + timeout, [None] * len(procs)
        while time.monotonic() < deadline and None in ended:
            for i, proc in enumerate(procs):
                if ended[i] is None and proc.poll() is not None:
                    ended[i] = time.monotonic()
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            proc.wait(timeout=30)
        for log in logs:
            log.close()
    finished = []
    for i, (proc, config) in enumerate(zip(procs, configs, strict=True)):
        path = pathlib.Path(config["result"])
        result = json.loads(path.read_text()) if path.exists() else None
        status = proc.returncode if ended[i] is not None else None
        finished.append(Finished(status, (folder / f"log{i}.txt").read_text(),
                                 ended[i] or time.monotonic(), result))
    return finished


def check_ok(finished: list[Finished]) -> None:
    for i, f in enumerate(finished):
        assert f.returncode == 0 and f.result is not None, (
            f"process {i} ended with {f.returncode}:\n{f.tail()}")


def max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two {name: array} results."""
    return max(float(np.max(np.abs(np.subtract(a[k], b[k])))) for k in a)
