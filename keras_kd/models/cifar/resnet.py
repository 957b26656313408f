"""The CIFAR ResNets: `resnet8` to `resnet110`, `resnet8x4`, `resnet32x4`.

The residual networks for CIFAR of "Deep Residual Learning for Image
Recognition" (He et al., arXiv:1512.03385), as the distillation literature
defines them (mdistiller's `mdistiller/models/cifar/resnet.py`): a 3x3
convolution, batch norm and ReLU (the stem), three stages of `n` basic
blocks (depth `6n + 2`), the second and third starting with stride 2, an
8x8 average pooling and a dense classifier. The `x4` variants have four
times the channels of the stages.

Named layers, for 32x32 inputs (`C` = 16, 16, 32, 64 channels, or 32, 64,
128, 256 for the `x4` variants):

- `"stem"`: the ReLU after the first convolution and batch norm,
  (32, 32, C[0]);
- `"stage1"`, `"stage2"`, `"stage3"`: the output of each stage, the ReLU of
  its last block: (32, 32, C[1]), (16, 16, C[2]), (8, 8, C[3]);
- `"stage1_preact"`, ...: the same sums before that ReLU (the residual
  branch plus the shortcut), which feature-distillation methods read;
- `"pooled"`: the pooled features the classifier reads, (C[3],).

Each weighted layer is named after the module of the reference that holds
its weights, the module path with `_` for `.` (`"conv1"`, `"bn1"`,
`"layer2_0_conv1"` for `layer2.0.conv1`, `"layer2_0_downsample_0"`, ...,
`"fc"`), so `load_torch_weights` reads the reference's checkpoints.
"""

import keras

from keras_kd.models.cifar._layers import (batch_norm, conv, keras_name,
                                          relu)

INPUT_SHAPE = (32, 32, 3)


def basic_block(x, planes, *, stride, name, shortcut="downsample",
                output_names=None):
    """Two 3x3 convolutions with batch norm, added to a shortcut, then a
    ReLU. The shortcut is a 1x1 convolution and batch norm (PyTorch
    module `<name>.<shortcut>`) where the stride or the channels change,
    else the input itself. `output_names` names the sum and the ReLU."""
    sum_name, out_name = output_names or (f"{name}.add", f"{name}.relu2")
    y = conv(x, planes, 3, strides=stride, padding=1, name=f"{name}.conv1")
    y = batch_norm(y, name=f"{name}.bn1")
    y = relu(y, name=f"{name}.relu1")
    y = conv(y, planes, 3, padding=1, name=f"{name}.conv2")
    y = batch_norm(y, name=f"{name}.bn2")
    y = keras.layers.Add(name=keras_name(sum_name))(
        [y, _shortcut(x, planes, stride, f"{name}.{shortcut}")])
    return relu(y, name=out_name)


def bottleneck_block(x, planes, *, stride, name, shortcut="downsample",
                     output_names=None):
    """A 1x1 convolution to `planes` channels, a 3x3 convolution (with the
    stride) and a 1x1 convolution to `4 * planes`, each with batch norm,
    added to a shortcut, then a ReLU; the shortcut as in `basic_block`."""
    sum_name, out_name = output_names or (f"{name}.add", f"{name}.relu3")
    y = conv(x, planes, 1, name=f"{name}.conv1")
    y = batch_norm(y, name=f"{name}.bn1")
    y = relu(y, name=f"{name}.relu1")
    y = conv(y, planes, 3, strides=stride, padding=1, name=f"{name}.conv2")
    y = batch_norm(y, name=f"{name}.bn2")
    y = relu(y, name=f"{name}.relu2")
    y = conv(y, 4 * planes, 1, name=f"{name}.conv3")
    y = batch_norm(y, name=f"{name}.bn3")
    y = keras.layers.Add(name=keras_name(sum_name))(
        [y, _shortcut(x, 4 * planes, stride, f"{name}.{shortcut}")])
    return relu(y, name=out_name)


def _shortcut(x, channels, stride, name):
    if stride == 1 and x.shape[-1] == channels:
        return x
    x = conv(x, channels, 1, strides=stride, name=f"{name}.0")
    return batch_norm(x, name=f"{name}.1")


def stage(x, block, planes, blocks, *, stride, index, shortcut):
    """`blocks` blocks, the PyTorch `nn.Sequential` `layer<index>`; the
    first has the stride. The last block's sum and ReLU are named
    `"stage<index>_preact"` and `"stage<index>"`."""
    for i in range(blocks):
        last = i == blocks - 1
        x = block(
            x, planes, stride=stride if i == 0 else 1,
            name=f"layer{index}.{i}", shortcut=shortcut,
            output_names=((f"stage{index}_preact", f"stage{index}")
                          if last else None))
    return x


def _resnet(depth, widths, num_classes, name):
    blocks = (depth - 2) // 6  # depth 6n + 2
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = conv(inputs, widths[0], 3, padding=1, name="conv1")
    x = batch_norm(x, name="bn1")
    x = relu(x, name="stem")
    for index, planes in enumerate(widths[1:], start=1):
        x = stage(x, basic_block, planes, blocks,
                  stride=1 if index == 1 else 2, index=index,
                  shortcut="downsample")
    # The reference's `nn.AvgPool2d(8)`: one 8x8 window on 8x8 features.
    x = keras.layers.AveragePooling2D(8, name="avgpool")(x)
    x = keras.layers.Flatten(name="pooled")(x)
    outputs = keras.layers.Dense(num_classes, name="fc")(x)
    return keras.Model(inputs, outputs, name=name)


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def resnet8(num_classes=100, *, name="resnet8"):
    """ResNet-8 for CIFAR: one basic block per stage, 16-32-64 channels.

    83,892 trainable parameters with 100 classes. Named layers: `"stem"`
    (32, 32, 16), `"stage1"` (32, 32, 16), `"stage2"` (16, 16, 32),
    `"stage3"` (8, 8, 64), each `"stage<i>_preact"` before the ReLU, and
    `"pooled"` (64,).

    Args:
        num_classes: the number of logits.
        name: the model's name.

    Returns:
        A Functional `keras.Model` from (32, 32, 3) images to logits.

    Example:

    ```python
    import keras
    from keras_kd.models import cifar

    student = cifar.resnet8()
    features = keras.Model(student.inputs,
                           student.get_layer("stage3").output)
    ```
    """
    return _resnet(8, _NARROW, num_classes, name)


def resnet14(num_classes=100, *, name="resnet14"):
    """ResNet-14 for CIFAR: two basic blocks per stage, 16-32-64 channels.

    181,108 trainable parameters with 100 classes; named layers as in
    `resnet8`.

    Args:
        num_classes: the number of logits.
        name: the model's name.

    Returns:
        A Functional `keras.Model` from (32, 32, 3) images to logits.

    Example:

    ```python
    student = keras_kd.models.cifar.resnet14()
    ```
    """
    return _resnet(14, _NARROW, num_classes, name)


def resnet20(num_classes=100, *, name="resnet20"):
    """ResNet-20 for CIFAR: three basic blocks per stage, 16-32-64 channels.

    278,324 trainable parameters with 100 classes; named layers as in
    `resnet8`.

    Args:
        num_classes: the number of logits.
        name: the model's name.

    Returns:
        A Functional `keras.Model` from (32, 32, 3) images to logits.

    Example:

    ```python
    student = keras_kd.models.cifar.resnet20()
    ```
    """
    return _resnet(20, _NARROW, num_classes, name)


def resnet32(num_classes=100, *, name="resnet32"):
    """ResNet-32 for CIFAR: five basic blocks per stage, 16-32-64 channels.

    472,756 trainable parameters with 100 classes; named layers as in
    `resnet8`.

    Args:
        num_classes: the number of logits.
        name: the model's name.

    Returns:
        A Functional `keras.Model` from (32, 32, 3) images to logits.

    Example:

    ```python
    student = keras_kd.models.cifar.resnet32()
    ```
    """
    return _resnet(32, _NARROW, num_classes, name)


def resnet44(num_classes=100, *, name="resnet44"):
    """ResNet-44 for CIFAR: seven basic blocks per stage, 16-32-64 channels.

    667,188 trainable parameters with 100 classes; named layers as in
    `resnet8`.

    Args:
        num_classes: the number of logits.
        name: the model's name.

    Returns:
        A Functional `keras.Model` from (32, 32, 3) images to logits.

    Example:

    ```python
    student = keras_kd.models.cifar.resnet44()
    ```
    """
    return _resnet(44, _NARROW, num_classes, name)


def resnet56(num_classes=100, *, name="resnet56"):
    """ResNet-56 for CIFAR: nine basic blocks per stage, 16-32-64 channels.

    861,620 trainable parameters with 100 classes; named layers as in
    `resnet8`. A teacher of the CIFAR-100 distillation benchmark.

    Args:
        num_classes: the number of logits.
        name: the model's name.

    Returns:
        A Functional `keras.Model` from (32, 32, 3) images to logits.

    Example:

    ```python
    teacher = keras_kd.models.cifar.resnet56()
    ```
    """
    return _resnet(56, _NARROW, num_classes, name)


def resnet110(num_classes=100, *, name="resnet110"):
    """ResNet-110 for CIFAR: 18 basic blocks per stage, 16-32-64 channels.

    1,736,564 trainable parameters with 100 classes; named layers as in
    `resnet8`. A teacher of the CIFAR-100 distillation benchmark.

    Args:
        num_classes: the number of logits.
        name: the model's name.

    Returns:
        A Functional `keras.Model` from (32, 32, 3) images to logits.

    Example:

    ```python
    teacher = keras_kd.models.cifar.resnet110()
    ```
    """
    return _resnet(110, _NARROW, num_classes, name)


def resnet8x4(num_classes=100, *, name="resnet8x4"):
    """ResNet-8x4 for CIFAR: one basic block per stage, 64-128-256 channels
    after a 32-channel stem.

    1,233,540 trainable parameters with 100 classes. Named layers: `"stem"`
    (32, 32, 32), `"stage1"` (32, 32, 64), `"stage2"` (16, 16, 128),
    `"stage3"` (8, 8, 256), each `"stage<i>_preact"` before the ReLU, and
    `"pooled"` (256,).

    Args:
        num_classes: the number of logits.
        name: the model's name.

    Returns:
        A Functional `keras.Model` from (32, 32, 3) images to logits.

    Example:

    ```python
    from keras_kd.models import cifar

    teacher = cifar.resnet32x4()
    student = cifar.resnet8x4()
    term = keras_kd.Term(keras_kd.losses.FeatureMSE(),
                         teacher_layer="stage3_preact",
                         student_layer="stage3_preact")
    ```
    """
    return _resnet(8, _WIDE, num_classes, name)


def resnet32x4(num_classes=100, *, name="resnet32x4"):
    """ResNet-32x4 for CIFAR: five basic blocks per stage, 64-128-256
    channels after a 32-channel stem.

    7,433,860 trainable parameters with 100 classes; named layers as in
    `resnet8x4`. A teacher of the CIFAR-100 distillation benchmark.

    Args:
        num_classes: the number of logits.
        name: the model's name.

    Returns:
        A Functional `keras.Model` from (32, 32, 3) images to logits.

    Example:

    ```python
    from keras_kd.models import cifar

    teacher = cifar.load_torch_weights(
        cifar.resnet32x4(),
        "cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth")
    ```
    """
    return _resnet(32, _WIDE, num_classes, name)
