"""PSP training across devices and processes.

Three paths, one per distribution engine:

- **JAX, several processes** (`fit` path): `initialize(...)` in every
  process, `keras.distribution.DataParallel`, then plain `model.fit`.
- **TensorFlow, `MultiWorkerMirroredStrategy`**: `train(...)`, a custom loop
  (Keras 3's `fit` fails there, keras-team/keras#20585).
- **TensorFlow, `MirroredStrategy`** (several devices, one process): plain
  `model.fit`.

`fit(...)` picks the right one. α, masks and the monitor's figures are the
same in every process; only the chief (`is_chief()`) writes files: the
`SeparationMonitor` event file, and callbacks wrapped in `ChiefOnly`;
`BackupAndRestore` restores everywhere and saves from the chief. After JAX
training, `local_copy(model)` gives a process-local model to slim and export.
"""

from keras_psp.distributed.callbacks import BackupAndRestore, ChiefOnly
from keras_psp.distributed.cluster import is_chief, process_count, process_index, process_local
from keras_psp.distributed.engine import fit, initialize, local_copy
from keras_psp.distributed.loop import WorkerLostError, train

__all__ = ["BackupAndRestore", "ChiefOnly", "WorkerLostError", "fit", "initialize", "is_chief",
           "local_copy", "process_count", "process_index", "process_local", "train"]
