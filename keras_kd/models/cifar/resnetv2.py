"""ResNet-18 and ResNet-50 for CIFAR: `resnet18`, `resnet50`.

The ImageNet ResNets of "Deep Residual Learning for Image Recognition"
(He et al., arXiv:1512.03385) adapted to 32x32 images as the distillation
literature uses them (mdistiller's `mdistiller/models/cifar/resnetv2.py`,
`ResNet18` and `ResNet50`): a 3x3 stem convolution with stride 1 and no
max pooling, four stages of 64, 128, 256 and 512 planes (the last three
starting with stride 2), global average pooling and a dense classifier
named `"linear"`. ResNet-18 has 2 basic blocks per stage; ResNet-50 has
3, 4, 6, 3 bottleneck blocks, whose outputs have four times the planes.

Named layers, for 32x32 inputs (`E` = 1 for `resnet18`, 4 for
`resnet50`):

- `"stem"`: the ReLU after the first convolution and batch norm,
  (32, 32, 64);
- `"stage1"` to `"stage4"`: the output of each stage, the ReLU of its last
  block: (32, 32, 64 E), (16, 16, 128 E), (8, 8, 256 E), (4, 4, 512 E);
- `"stage1_preact"`, ...: the same sums before that ReLU;
- `"pooled"`: the globally averaged features the classifier reads,
  (512 E,).

Each weighted layer is named after the module of the reference that holds
its weights, the module path with `_` for `.` (`"conv1"`, `"bn1"`,
`"layer2_0_conv1"` for `layer2.0.conv1`, `"layer2_0_shortcut_0"`, ...,
`"linear"`), so `load_torch_weights` reads the reference's checkpoints.
"""

import keras

from keras_kd.models.cifar._layers import batch_norm, conv, relu
from keras_kd.models.cifar.resnet import (INPUT_SHAPE, basic_block,
                                          bottleneck_block, stage)


def _resnet(block, blocks, num_classes, name):
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = conv(inputs, 64, 3, padding=1, name="conv1")
    x = batch_norm(x, name="bn1")
    x = relu(x, name="stem")
    for index, (planes, count) in enumerate(zip((64, 128, 256, 512),
                                                 blocks), start=1):
        x = stage(x, block, planes, count, stride=1 if index == 1 else 2,
                  index=index, shortcut="shortcut")
    x = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
    outputs = keras.layers.Dense(num_classes, name="linear")(x)
    return keras.Model(inputs, outputs, name=name)


def resnet18(num_classes=100, *, name="resnet18"):
    """ResNet-18 for CIFAR: two basic blocks per stage, 64 to 512 planes.

    11,220,132 trainable parameters with 100 classes. Named layers:
    `"stem"` (32, 32, 64), `"stage1"` (32, 32, 64), `"stage2"`
    (16, 16, 128), `"stage3"` (8, 8, 256), `"stage4"` (4, 4, 512), each
    `"stage<i>_preact"` before the ReLU, and `"pooled"` (512,).

    Args:
        num_classes: the number of logits.
        name: the model's name.

    Returns:
        A Functional `keras.Model` from (32, 32, 3) images to logits.

    Example:

    ```python
    import keras
    from keras_kd.models import cifar

    student = cifar.resnet18()
    features = keras.Model(student.inputs,
                           student.get_layer("stage4").output)
    ```
    """
    return _resnet(basic_block, (2, 2, 2, 2), num_classes, name)


def resnet50(num_classes=100, *, name="resnet50"):
    """ResNet-50 for CIFAR: 3, 4, 6 and 3 bottleneck blocks per stage.

    23,705,252 trainable parameters with 100 classes. Named layers:
    `"stem"` (32, 32, 64), `"stage1"` (32, 32, 256), `"stage2"`
    (16, 16, 512), `"stage3"` (8, 8, 1024), `"stage4"` (4, 4, 2048), each
    `"stage<i>_preact"` before the ReLU, and `"pooled"` (2048,). A
    teacher of the CIFAR-100 distillation benchmark.

    Args:
        num_classes: the number of logits.
        name: the model's name.

    Returns:
        A Functional `keras.Model` from (32, 32, 3) images to logits.

    Example:

    ```python
    from keras_kd.models import cifar

    teacher = cifar.load_torch_weights(
        cifar.resnet50(),
        "cifar_teachers/ResNet50_vanilla/ckpt_epoch_240.pth")
    ```
    """
    return _resnet(bottleneck_block, (3, 4, 6, 3), num_classes, name)
