"""Layer-wise learning rates from the divergence between student and teacher
maps at paired layers (see `LayerwiseLearningRate`)."""

from keras_kd.layerwise.autodiff import hessian_vector_products
from keras_kd.layerwise.autodiff import hutchinson_diagonals
from keras_kd.layerwise.autodiff import top_logit_gradients
from keras_kd.layerwise.optimizer import LayerwiseOptimizer
from keras_kd.layerwise.signals import collapse_channels
from keras_kd.layerwise.signals import divergence_scales
from keras_kd.layerwise.signals import js_divergence
from keras_kd.layerwise.signals import map_divergence
from keras_kd.layerwise.signals import normalize_map
from keras_kd.layerwise.config import LayerwiseLearningRate
from keras_kd.layerwise.config import attach
from keras_kd.layerwise.routing import LayerwiseState
