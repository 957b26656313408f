"""The Distiller's backend trainers: "differentiate and apply", one small
module per Keras backend, over the backend-agnostic step of
`keras_kd.step` and `keras_kd.trainers.base`.

`Trainer` is the class for the backend Keras runs on, chosen at import as
`keras.Model` chooses its own trainer.
"""

import keras

_BACKEND = keras.backend.backend()

if _BACKEND == "tensorflow":
    from keras_kd.trainers.tensorflow import TensorFlowTrainer as Trainer
elif _BACKEND == "jax":
    from keras_kd.trainers.jax import (  # type: ignore[assignment]
        JAXTrainer as Trainer)
elif _BACKEND == "torch":
    from keras_kd.trainers.torch import (  # type: ignore[assignment]
        TorchTrainer as Trainer)
else:
    from keras_kd.trainers.unsupported import (  # type: ignore[assignment]
        UnsupportedTrainer as Trainer)
