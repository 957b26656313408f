"""keras-kd: knowledge distillation for Keras 3."""

from keras_kd import losses, ops
from keras_kd.distiller import Distiller
from keras_kd.layerwise import LayerwiseLearningRate
from keras_kd.local import LocalModules
from keras_kd.term import Term

__version__ = "0.1.0"
