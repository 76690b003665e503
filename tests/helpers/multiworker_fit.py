"""One worker of a multi-worker JEM run, for tests. Reads TF_CONFIG; writes its final weights and
replay buffer to OUT/<task_type>-<task_id>.npz.

usage: python multiworker_fit.py OUT WORKDIR EPOCHS [EVENT_FILE EPOCH BATCH]

With EVENT_FILE, the worker stops after batch BATCH of epoch EPOCH (from 0), creates EVENT_FILE and waits there
to be killed (train_until_event.AfterBatch), so that a test's kill lands mid-run.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from jem_tf import JEM, SGLDSampler, small_cnn  # noqa: E402
from jem_tf.data import load_digits, make_dataset  # noqa: E402
from jem_tf.sampling.distribution import is_chief, make_strategy, worker_id  # noqa: E402
from jem_tf.training.callbacks import ChiefBackupAndRestore  # noqa: E402


def main(out, workdir, epochs, event=None):
    import keras
    from train_until_event import AfterBatch  # this script's folder is on sys.path

    strategy = make_strategy("multi_worker")
    data = load_digits(seed=0)
    dataset = make_dataset(data.x_train[:256], data.y_train[:256], batch_size=32, shuffle=True, seed=0)
    with strategy.scope():
        model = JEM(small_cnn(num_classes=10, input_shape=(8, 8, 1), width=8, seed=0),
                    sampler=SGLDSampler(n_steps=5), buffer_size=200, seed=0)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
    backup = ChiefBackupAndRestore(os.path.join(workdir, "backup"), is_chief=is_chief(strategy))
    callbacks = [backup] + ([] if event is None else [AfterBatch(event[0], int(event[1]), int(event[2]))])
    model.fit(dataset, epochs=epochs, verbose=2, callbacks=callbacks)
    np.savez(os.path.join(out, worker_id(strategy) + ".npz"),
             buffer=model.replay_buffer.samples.numpy(),
             iterations=int(model.optimizer.iterations.numpy()),
             resumed_from=-1 if backup.resumed_from_epoch is None else backup.resumed_from_epoch,
             *model.get_weights())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:7] or None)
