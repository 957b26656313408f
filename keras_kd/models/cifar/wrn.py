"""Wide residual networks for CIFAR: `wrn_16_1`, `wrn_16_2`, `wrn_40_1`,
`wrn_40_2`.

"Wide Residual Networks" (Zagoruyko and Komodakis, BMVC 2016,
arXiv:1605.07146) as the distillation literature defines them (mdistiller's
`mdistiller/models/cifar/wrn.py`): WRN-d-k has a 3x3 stem convolution with
16 channels, three stages of `(d - 4) / 6` pre-activation blocks with
16 k, 32 k and 64 k channels (the second and third starting with
stride 2), a final batch norm and ReLU, 8x8 average pooling and a dense
classifier. A pre-activation block is batch norm, ReLU, 3x3 convolution,
batch norm, ReLU, 3x3 convolution, added to a shortcut: the block's input
itself where the channels do not change, else a strided 1x1 convolution of
the block's activated input.

The blocks have no activation at their output, so the named layers follow
the reference's own features (its `forward`), for 32x32 inputs:

- `"stem"`: the first convolution's output, (32, 32, 16), before any
  batch norm or activation;
- `"stage1"`, `"stage2"`, `"stage3"`: the output of each stage, the sum of
  its last block, with no activation: (32, 32, 16 k), (16, 16, 32 k),
  (8, 8, 64 k);
- `"stage1_preact"`, `"stage2_preact"`, `"stage3_preact"`: that output
  after the batch norm that the next stage's first block (for stage 3,
  the final batch norm `"bn1"`) applies before its ReLU: the features
  just before the activation that follows each stage;
- `"pooled"`: the pooled features the classifier reads, (64 k,).

Each weighted layer is named after the module of the reference that holds
its weights, the module path with `_` for `.` (`"conv1"`,
`"block1_layer_0_bn1"` for `block1.layer.0.bn1`,
`"block2_layer_0_convShortcut"`, ..., `"bn1"`, `"fc"`), so
`load_torch_weights` reads the reference's checkpoints.
"""

import keras

from keras_kd.models.cifar._layers import (batch_norm, conv, keras_name,
                                          relu)
from keras_kd.models.cifar.resnet import INPUT_SHAPE


def _block(x, planes, *, stride, name, preact_name=None, output_name=None):
    """A pre-activation block. `preact_name` names its first batch norm's
    output (an identity layer after it); `output_name` names the sum."""
    activated = batch_norm(x, name=f"{name}.bn1")
    if preact_name:
        activated = keras.layers.Identity(name=preact_name)(activated)
    activated = relu(activated, name=f"{name}.relu1")
    y = conv(activated, planes, 3, strides=stride, padding=1,
             name=f"{name}.conv1")
    y = batch_norm(y, name=f"{name}.bn2")
    y = relu(y, name=f"{name}.relu2")
    y = conv(y, planes, 3, padding=1, name=f"{name}.conv2")
    if x.shape[-1] == planes:
        shortcut = x
    else:
        shortcut = conv(activated, planes, 1, strides=stride,
                        name=f"{name}.convShortcut")
    return keras.layers.Add(name=output_name or keras_name(f"{name}.add"))(
        [shortcut, y])


def _wrn(depth, widen_factor, num_classes, name):
    blocks = (depth - 4) // 6  # depth 6n + 4
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = conv(inputs, 16, 3, padding=1, name="conv1")
    x = keras.layers.Identity(name="stem")(x)
    for index in (1, 2, 3):
        planes = 16 * 2 ** (index - 1) * widen_factor
        for i in range(blocks):
            x = _block(
                x, planes, stride=2 if index > 1 and i == 0 else 1,
                name=f"block{index}.layer.{i}",
                preact_name=(f"stage{index - 1}_preact"
                             if index > 1 and i == 0 else None),
                output_name=f"stage{index}" if i == blocks - 1 else None)
    x = batch_norm(x, name="bn1")
    x = keras.layers.Identity(name="stage3_preact")(x)
    x = relu(x, name="relu")
    # The reference's `F.avg_pool2d(out, 8)`: one 8x8 window.
    x = keras.layers.AveragePooling2D(8, name="avgpool")(x)
    x = keras.layers.Flatten(name="pooled")(x)
    outputs = keras.layers.Dense(num_classes, name="fc")(x)
    return keras.Model(inputs, outputs, name=name)


def wrn_16_1(num_classes=100, *, name="wrn_16_1"):
    """WRN-16-1 for CIFAR: two blocks per stage, 16, 32 and 64 channels.

    180,916 trainable parameters with 100 classes. Named layers: `"stem"`
    (32, 32, 16), `"stage1"` (32, 32, 16), `"stage2"` (16, 16, 32),
    `"stage3"` (8, 8, 64), each `"stage<i>_preact"` (the stage's output
    after the next batch norm) and `"pooled"` (64,); see the module's
    description.

    Args:
        num_classes: the number of logits.
        name: the model's name.

    Returns:
        A Functional `keras.Model` from (32, 32, 3) images to logits.

    Example:

    ```python
    import keras
    from keras_kd.models import cifar

    student = cifar.wrn_16_1()
    features = keras.Model(student.inputs,
                           student.get_layer("stage3_preact").output)
    ```
    """
    return _wrn(16, 1, num_classes, name)


def wrn_16_2(num_classes=100, *, name="wrn_16_2"):
    """WRN-16-2 for CIFAR: two blocks per stage, 32, 64 and 128 channels.

    703,284 trainable parameters with 100 classes. Named layers: `"stem"`
    (32, 32, 16), `"stage1"` (32, 32, 32), `"stage2"` (16, 16, 64),
    `"stage3"` (8, 8, 128), each `"stage<i>_preact"` and `"pooled"`
    (128,), as in `wrn_16_1`.

    Args:
        num_classes: the number of logits.
        name: the model's name.

    Returns:
        A Functional `keras.Model` from (32, 32, 3) images to logits.

    Example:

    ```python
    student = keras_kd.models.cifar.wrn_16_2()
    ```
    """
    return _wrn(16, 2, num_classes, name)


def wrn_40_1(num_classes=100, *, name="wrn_40_1"):
    """WRN-40-1 for CIFAR: six blocks per stage, 16, 32 and 64 channels.

    569,780 trainable parameters with 100 classes; named layers and their
    shapes as in `wrn_16_1`.

    Args:
        num_classes: the number of logits.
        name: the model's name.

    Returns:
        A Functional `keras.Model` from (32, 32, 3) images to logits.

    Example:

    ```python
    student = keras_kd.models.cifar.wrn_40_1()
    ```
    """
    return _wrn(40, 1, num_classes, name)


def wrn_40_2(num_classes=100, *, name="wrn_40_2"):
    """WRN-40-2 for CIFAR: six blocks per stage, 32, 64 and 128 channels.

    2,255,156 trainable parameters with 100 classes; named layers and their
    shapes as in `wrn_16_2`. A teacher of the CIFAR-100 distillation
    benchmark.

    Args:
        num_classes: the number of logits.
        name: the model's name.

    Returns:
        A Functional `keras.Model` from (32, 32, 3) images to logits.

    Example:

    ```python
    from keras_kd.models import cifar

    teacher = cifar.load_torch_weights(
        cifar.wrn_40_2(),
        "cifar_teachers/wrn_40_2_vanilla/ckpt_epoch_240.pth")
    ```
    """
    return _wrn(40, 2, num_classes, name)
