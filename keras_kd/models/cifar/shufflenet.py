"""ShuffleNet V1 and V2, in their CIFAR-100 form.

The CIFAR forms of "ShuffleNet: An Extremely Efficient Convolutional Neural
Network for Mobile Devices" (Zhang et al., arXiv:1707.01083) and
"ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design"
(Ma et al., arXiv:1807.11164) that mdistiller defines as `ShuffleV1` and
`ShuffleV2` (`mdistiller/models/cifar/ShuffleNetv1.py`, `ShuffleNetv2.py`),
with their default configurations. Both start with a 1x1 convolution to 24
channels at 32x32 (`"conv1"`, `"bn1"`), run three stages
`"layer1"` ... `"layer3"` that each halve the resolution in their first
block, and average the final 4x4 map before the linear `"linear"`.

A channel shuffle with `g` groups takes channel `i * C / g + j` to
position `j * g + i`; here it is a `Reshape`, a `Permute` and a
`Reshape` (named `"<module>.unfold"`, `".transpose"`, `".fold"`), so the
models hold only built-in Keras layers.

`shufflenet_v1` (groups 3; stages of 240, 480 and 960 channels, of 4, 8
and 4 blocks). A block is a grouped 1x1 convolution to a quarter of its
output channels, a channel shuffle, a 3x3 depthwise convolution, and a
grouped 1x1 convolution; the first 1x1 convolution of the first block
(24 input channels) is not grouped and is followed by no shuffle. A first
block (stride 2) concatenates its output with a 3x3, stride 2 average
pooling of its input (zero padding counted in the average, as PyTorch's
`AvgPool2d(3, 2, padding=1)`); the others add their input. A ReLU
follows the merge.

`shufflenet_v2` (width 1: stages of 116, 232 and 464 channels, of 1 + 3,
1 + 7 and 1 + 3 blocks, then a 1x1 convolution `"conv2"` to 1024
channels). The first block of a stage runs two branches at stride 2 and
concatenates them; each following block splits its channels in halves,
passes the first half through and transforms the second, and concatenates
the two. Every block ends with a channel shuffle of 2 groups.

Named outputs (mdistiller's `feats`, `preact_feats` and `pooled_feat`):

- `"stem"`: `"bn1"` after its ReLU, `(32, 32, 24)`; the reference's first
  `feats` and also its first `preact_feats`;
- `"stage1"` ... `"stage3"`: the outputs of the three stages (V1:
  `(16, 16, 240)`, `(8, 8, 480)`, `(4, 4, 960)`; V2: `(16, 16, 116)`,
  `(8, 8, 232)`, `(4, 4, 464)`);
- `"stage1_preact"` ... `"stage3_preact"`: the last block of the stage
  before its last ReLU. V1: the sum of branch and input before the ReLU.
  V2: the concatenation of the passed half and the transformed half before
  its ReLU, and before the channel shuffle, so in another channel order
  than `"stageN"` (as in the reference);
- `"pooled"`: the averaged features that the classifier reads (V1: 960,
  V2: 1024).

Layers that hold weights carry the PyTorch module paths of the reference:
`"layer2.0.conv1"`, `"layer2.0.bn1"`, ... for the modules of the first
block of the second stage.
"""

import keras

from keras_kd.models.cifar import _layers


def _channel_shuffle(x, groups, path):
    """The reference's `ShuffleBlock`, on channels-last features."""
    height, width, channels = x.shape[1:]
    x = keras.layers.Reshape(
        (height, width, groups, channels // groups),
        name=f"{path}.unfold")(x)
    x = keras.layers.Permute((1, 2, 4, 3), name=f"{path}.transpose")(x)
    return keras.layers.Reshape((height, width, channels),
                                name=f"{path}.fold")(x)


def _conv_bn(x, filters, kernel_size, path, index, *, strides=1, padding=0,
             groups=1):
    """`conv<index>` then `bn<index>` of the module at `path`."""
    x = _layers.conv(x, filters, kernel_size, strides=strides,
                     padding=padding, groups=groups,
                     name=f"{path}.conv{index}")
    return _layers.batch_norm(x, name=f"{path}.bn{index}")


def _depthwise_bn(x, strides, path, index):
    x = _layers.depthwise_conv(x, 3, strides=strides, padding=1,
                               name=f"{path}.conv{index}")
    return _layers.batch_norm(x, name=f"{path}.bn{index}")


def _stem(inputs):
    x = _layers.conv(inputs, 24, 1, name="conv1")
    x = _layers.batch_norm(x, name="bn1")
    return _layers.relu(x, name="stem")


def _head(x, num_classes):
    x = keras.layers.AveragePooling2D(4, name="avgpool")(x)
    x = keras.layers.Flatten(name="pooled")(x)
    return keras.layers.Dense(num_classes, name="linear")(x)


def _v1_block(x, filters, strides, groups, path, stage=None):
    """The reference's `Bottleneck`; `filters` excludes the channels that a
    stride-2 block concatenates from its input. `stage`: the stage whose
    last block this is, if it is one."""
    middle = filters // 4
    first_groups = 1 if x.shape[-1] == 24 else groups
    y = _conv_bn(x, middle, 1, path, 1, groups=first_groups)
    y = _layers.relu(y, name=f"{path}.relu1")
    if first_groups > 1:
        y = _channel_shuffle(y, first_groups, f"{path}.shuffle1")
    y = _depthwise_bn(y, strides, path, 2)
    y = _layers.relu(y, name=f"{path}.relu2")
    y = _conv_bn(y, filters, 1, path, 3, groups=groups)
    merge = f"stage{stage}_preact" if stage else f"{path}.merge"
    if strides == 2:
        # `nn.AvgPool2d(3, stride=2, padding=1)` divides by 9 everywhere,
        # zeros included: pad explicitly, then pool without padding.
        shortcut = keras.layers.ZeroPadding2D(
            1, name=f"{path}.shortcut.pad")(x)
        shortcut = keras.layers.AveragePooling2D(
            3, strides=2, name=f"{path}.shortcut.0")(shortcut)
        y = keras.layers.Concatenate(name=merge)([y, shortcut])
    else:
        y = keras.layers.Add(name=merge)([y, x])
    return _layers.relu(y, name=f"stage{stage}" if stage else
                        f"{path}.relu3")


def shufflenet_v1(num_classes=100, *, name=None):
    """ShuffleNet V1 with 3 groups, for 32x32 images.

    mdistiller's `ShuffleV1`; 949,258 trainable parameters with 100
    classes. The layers and named outputs (`"stem"`, `"stage1"` to
    `"stage3"`, `"stage1_preact"` to `"stage3_preact"`, `"pooled"`) are
    described in `keras_kd.models.cifar.shufflenet`.

    Args:
        num_classes: the number of logits.
        name: the model's name; `"shufflenet_v1"` by default.

    Returns:
        A Functional `keras.Model` from `(32, 32, 3)` images (channels
        last) to `num_classes` logits.

    Example:

    ```python
    import keras
    from keras_kd.models import cifar

    model = cifar.shufflenet_v1()
    stage2 = keras.Model(model.inputs, model.get_layer("stage2").output)
    ```
    """
    groups = 3
    inputs = keras.Input((32, 32, 3), name="image")
    x = _stem(inputs)
    for stage, (filters, blocks) in enumerate(
            zip((240, 480, 960), (4, 8, 4)), start=1):
        for block in range(blocks):
            first = block == 0
            x = _v1_block(
                x, filters - x.shape[-1] if first else filters,
                2 if first else 1, groups, f"layer{stage}.{block}",
                stage=stage if block == blocks - 1 else None)
    outputs = _head(x, num_classes)
    return keras.Model(inputs, outputs, name=name or "shufflenet_v1")


def _v2_down_block(x, filters, path):
    """The reference's `DownBlock`: two stride-2 branches, concatenated."""
    half = filters // 2
    left = _depthwise_bn(x, 2, path, 1)
    left = _conv_bn(left, half, 1, path, 2)
    left = _layers.relu(left, name=f"{path}.relu2")
    right = _conv_bn(x, half, 1, path, 3)
    right = _layers.relu(right, name=f"{path}.relu3")
    right = _depthwise_bn(right, 2, path, 4)
    right = _conv_bn(right, half, 1, path, 5)
    right = _layers.relu(right, name=f"{path}.relu5")
    x = keras.layers.Concatenate(name=f"{path}.concat")([left, right])
    return _channel_shuffle(x, 2, f"{path}.shuffle")


def _v2_basic_block(x, path, stage=None):
    """The reference's `BasicBlock`: the first half of the channels passes
    through, the second is transformed. `stage`: the stage whose last block
    this is, if it is one."""
    half = x.shape[-1] // 2
    kept, y = x[..., :half], x[..., half:]
    y = _conv_bn(y, half, 1, path, 1)
    y = _layers.relu(y, name=f"{path}.relu1")
    y = _depthwise_bn(y, 1, path, 2)
    y = _conv_bn(y, half, 1, path, 3)
    # The reference applies the ReLU to the transformed half, then
    # concatenates. The passed half is the (shuffled) output of ReLUs, so
    # a ReLU after the concatenation leaves it as it is and gives the same
    # values, with the concatenation before the ReLU in the graph: the
    # reference's `preact` of the stage.
    y = keras.layers.Concatenate(
        name=f"stage{stage}_preact" if stage else f"{path}.concat")(
            [kept, y])
    y = _layers.relu(y, name=f"{path}.relu3")
    y = _channel_shuffle(y, 2, f"{path}.shuffle")
    if stage:
        y = keras.layers.Identity(name=f"stage{stage}")(y)
    return y


def shufflenet_v2(num_classes=100, *, name=None):
    """ShuffleNet V2 at width 1, for 32x32 images.

    mdistiller's `ShuffleV2` (`net_size=1`); 1,355,528 trainable
    parameters with 100 classes. The layers and named outputs (`"stem"`,
    `"stage1"` to `"stage3"`, `"stage1_preact"` to `"stage3_preact"`,
    `"pooled"`) are described in `keras_kd.models.cifar.shufflenet`.

    Args:
        num_classes: the number of logits.
        name: the model's name; `"shufflenet_v2"` by default.

    Returns:
        A Functional `keras.Model` from `(32, 32, 3)` images (channels
        last) to `num_classes` logits.

    Example:

    ```python
    import keras
    from keras_kd.models import cifar

    model = cifar.shufflenet_v2()
    stage2 = keras.Model(model.inputs, model.get_layer("stage2").output)
    ```
    """
    inputs = keras.Input((32, 32, 3), name="image")
    x = _stem(inputs)
    for stage, (filters, blocks) in enumerate(
            zip((116, 232, 464), (3, 7, 3)), start=1):
        x = _v2_down_block(x, filters, f"layer{stage}.0")
        for block in range(1, blocks + 1):
            x = _v2_basic_block(x, f"layer{stage}.{block}",
                                stage=stage if block == blocks else None)
    x = _layers.conv(x, 1024, 1, name="conv2")
    x = _layers.batch_norm(x, name="bn2")
    x = _layers.relu(x, name="relu2")
    outputs = _head(x, num_classes)
    return keras.Model(inputs, outputs, name=name or "shufflenet_v2")
