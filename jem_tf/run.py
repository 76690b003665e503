"""A training run, in one import: the names of the modules that own its concepts, for code written against
``jem_tf.run`` (``jem_tf.evaluation.frechet``, ``bench/``, user scripts).

* :mod:`jem_tf.splits`: the run's dataset and its splits (:class:`RunSplits`, built once by :func:`run_splits`);
* :mod:`jem_tf.workdir`: the work directory's layout (:class:`RunLayout`), its config and the checks before a run
  writes to it; :mod:`jem_tf.workdir_lock`: one training per work directory;
* :mod:`jem_tf.model_files`: trained models read back (:func:`load_trained_model`, :func:`load_classifier`).

New code imports from those modules.
"""

from jem_tf.config_rules import RESUME_FIXED_FIELDS
from jem_tf.model_files import ClassifierSource, classifier_file, load_classifier, load_trained_model
from jem_tf.splits import (
                           CALIBRATION_SPLITS,
                           RunSplits,
                           Split,
                           check_training_split,
                           dataset_splits,
                           held_out_split,
                           labelled_training_split,
                           load_run_dataset,
                           ood_calibration_data,
                           run_splits,
                           select_labelled,
                           split_train_validation,
)
from jem_tf.workdir import (
                           RunLayout,
                           check_output_dir,
                           clear_run,
                           load_run_config,
                           prepare_workdir,
                           save_model_atomically,
)
from jem_tf.workdir_lock import WorkdirBusy, WorkdirLock

__all__ = [
    "CALIBRATION_SPLITS",
    "ClassifierSource",
    "RESUME_FIXED_FIELDS",
    "RunLayout",
    "RunSplits",
    "Split",
    "WorkdirBusy",
    "WorkdirLock",
    "check_output_dir",
    "check_training_split",
    "classifier_file",
    "clear_run",
    "dataset_splits",
    "held_out_split",
    "labelled_training_split",
    "load_classifier",
    "load_run_config",
    "load_run_dataset",
    "load_trained_model",
    "ood_calibration_data",
    "prepare_workdir",
    "run_splits",
    "save_model_atomically",
    "select_labelled",
    "split_train_validation",
]
