"""``python -m jem_tf.train`` that stops at a known point of the run, tells the test and waits there to be
killed or interrupted, so that the test's signal lands exactly at that point (never after the run finished):

    python tests/helpers/train_until_event.py EVENT_FILE WHEN [jem_tf.train arguments ...]

WHEN is ``batch:E:B``: after batch B of epoch E (both counted from 0, epochs as the whole run counts them),
or ``final-save``: the final ``model.keras`` is written under its temporary name by the real writer and about
to be renamed into place. At that point the run creates EVENT_FILE and waits (up to 10 minutes) to be killed
or interrupted, or for the test to delete EVENT_FILE (the run then goes on, e.g. once the test filled the disk).
SIGUSR1 writes every thread's Python stack to stderr (a test that times out asks for it before killing the run).
"""

import faulthandler
import os
import signal
import sys
import time

import keras

import jem_tf.train as train
import jem_tf.training.pipeline as training


def _wait_to_be_killed(event_file):
    """Creates ``event_file`` and waits: to be killed, or for the test to delete the file (the run goes on)."""
    open(event_file, "w").close()
    deadline = time.time() + 600
    while os.path.exists(event_file):
        if time.time() > deadline:
            raise SystemExit("train_until_event: nobody killed the run")
        time.sleep(0.05)


class AfterBatch(keras.callbacks.Callback):
    """After batch ``batch`` of epoch ``epoch`` (from 0): creates ``event_file`` and waits (see the module)."""

    def __init__(self, event_file, epoch, batch):
        super().__init__()
        self.event_file, self.epoch, self.batch, self.current = event_file, epoch, batch, None

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch == self.batch:
            _wait_to_be_killed(self.event_file)


def main(event_file, when, argv):
    if when == "final-save":
        def hook(event, args):  # os.replace/os.rename of the final model's temporary file onto model.keras
            if event == "os.rename" and str(args[1]).endswith(os.sep + "model.keras"):
                _wait_to_be_killed(event_file)

        sys.addaudithook(hook)
        return train.main(argv)
    _, epoch, batch = when.split(":")
    train_and_evaluate = training.train_and_evaluate

    def with_event(config, workdir, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", ()), AfterBatch(event_file, int(epoch), int(batch))]
        return train_and_evaluate(config, workdir, **kwargs)

    training.train_and_evaluate = with_event
    return train.main(argv)


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
