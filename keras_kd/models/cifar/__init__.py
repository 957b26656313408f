"""The CIFAR-100 architectures of the distillation literature, in Keras.

Each builder returns a Functional `keras.Model` with input `(32, 32, 3)`
(channels last) and `num_classes` logits, with the architecture, the
trainable-parameter count and the computation of the reference definitions
in mdistiller (`mdistiller/models/cifar/`), which the distillation papers'
CIFAR-100 tables use.

Layer names that every model shares, for `Term(teacher_layer=...)`,
`LocalModules` and `LayerwiseLearningRate`:

- `"stem"`: the output of the first convolution block;
- `"stage1"`, `"stage2"`, ...: the output of each stage, after its
  activation;
- `"stage1_preact"`, ...: the same features before the last activation of
  the stage, which feature-distillation methods read;
- `"pooled"`: the pooled, flattened features that the classifier reads.

Every layer that holds weights is named after the PyTorch module that holds
the same weights, so `load_torch_weights` reads a PyTorch checkpoint of the
reference models.
"""

from keras_kd.models.cifar.weights import load_torch_weights
from keras_kd.models.cifar.resnet import resnet8
from keras_kd.models.cifar.resnet import resnet14
from keras_kd.models.cifar.resnet import resnet20
from keras_kd.models.cifar.resnet import resnet32
from keras_kd.models.cifar.resnet import resnet44
from keras_kd.models.cifar.resnet import resnet56
from keras_kd.models.cifar.resnet import resnet110
from keras_kd.models.cifar.resnet import resnet8x4
from keras_kd.models.cifar.resnet import resnet32x4
from keras_kd.models.cifar.resnetv2 import resnet18
from keras_kd.models.cifar.resnetv2 import resnet50
from keras_kd.models.cifar.wrn import wrn_16_1
from keras_kd.models.cifar.wrn import wrn_16_2
from keras_kd.models.cifar.wrn import wrn_40_1
from keras_kd.models.cifar.wrn import wrn_40_2
from keras_kd.models.cifar.mobilenetv2 import mobilenetv2
from keras_kd.models.cifar.shufflenet import shufflenet_v1
from keras_kd.models.cifar.shufflenet import shufflenet_v2
from keras_kd.models.cifar.vgg import vgg8
from keras_kd.models.cifar.vgg import vgg11
from keras_kd.models.cifar.vgg import vgg13
from keras_kd.models.cifar.vgg import vgg16
from keras_kd.models.cifar.vgg import vgg19
