"""keras-kd: knowledge distillation for Keras 3."""

from keras_kd import augment, cache, losses, metrics, ops
from keras_kd._version import __version__
from keras_kd.augment import affinity
from keras_kd.cache import TeacherCache, cache_teacher_outputs
from keras_kd.distiller import Distiller
from keras_kd.layerwise import LayerwiseLearningRate, LayerwiseOptimizer
from keras_kd.local import LocalModules
from keras_kd.plotting import plot_diagnostics
from keras_kd.term import Term
