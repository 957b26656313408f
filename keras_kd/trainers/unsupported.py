"""A trainer for the Keras backends that cannot train (NumPy, OpenVINO):
building and inference work, training and evaluation raise."""

import keras

from keras_kd.trainers.base import DistillerTrainer


class UnsupportedTrainer(DistillerTrainer):
    """Raises a clear error when asked to train or evaluate."""

    def _refuse(self, *args, **kwargs):
        raise NotImplementedError(
            f"The Distiller trains on the tensorflow, jax and torch "
            f"backends; Keras is running on '{keras.backend.backend()}', "
            "which has no automatic differentiation. Set KERAS_BACKEND to "
            "one of them before importing Keras."
        )

    train_step = _refuse
    test_step = _refuse
