"""LAKD local modules: the student trained as a chain of modules, each by its
own loss and its own gradient (see `LocalModules`)."""

from keras_kd.local.plan import LocalModulePlan
from keras_kd.local.config import LocalModules
