"""MobileNetV2 at half width, in its CIFAR-100 form.

The CIFAR form of "MobileNetV2: Inverted Residuals and Linear Bottlenecks"
(Sandler et al., arXiv:1801.04381) that mdistiller defines as `mobile_half`
(`mdistiller/models/cifar/mobilenetv2.py`: expansion 6, width multiplier
0.5) and that the distillation literature's CIFAR-100 tables call
`MobileNetV2`.

A stride-2 3x3 convolution `"conv1"` (16 channels), seven groups of
inverted residual blocks `"blocks.0"` ... `"blocks.6"` (8, 12, 16, 32, 48,
80 and 160 channels; strides 1, 1, 2, 2, 1, 2, 1), a 1x1 convolution
`"conv2"` to 1280 channels, a 2x2 average pooling and the linear
`"classifier.0"`. Each inverted residual block expands with a 1x1
convolution, filters with a 3x3 depthwise convolution and projects with a
1x1 convolution; only the first two are followed by a ReLU, and the block
adds its input when stride and width allow. The expansion is applied to
the first group too (its expansion ratio is 1, so its first 1x1
convolution keeps 16 channels).

Named outputs (mdistiller's `feats` and `pooled_feat`):

- `"stem"`: `"conv1"` after its ReLU, `(16, 16, 16)`;
- `"stage1"` ... `"stage4"`: the outputs of groups 1, 2, 4 and 6
  (`(16, 16, 12)`, `(8, 8, 16)`, `(4, 4, 48)`, `(2, 2, 160)`);
- `"stage1_preact"` ... `"stage4_preact"`: the same tensors. A block ends
  with its projection's batch normalization and no activation, so these
  features already precede any ReLU (the reference returns no
  `preact_feats` for this model; its `get_bn_before_relu` gives the
  batch normalizations that end the same groups). The names exist so that
  every model of `keras_kd.models.cifar` answers to them;
- `"pooled"`: the 1280 averaged features that the classifier reads.

Layers that hold weights carry the PyTorch module paths of the reference:
`"blocks.2.0.conv.0"` is the expanding convolution of the first block of
group 2, `"blocks.2.0.conv.1"` its batch normalization, `"conv.3"` the
depthwise convolution, `"conv.6"` the projection.
"""

import keras

from keras_kd.models.cifar import _layers

# (expansion, output channels, blocks, stride) of each group at full width.
_GROUPS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# The groups whose outputs are the reference's `feats[1:]`.
_STAGE_ENDS = (1, 2, 4, 6)


def _inverted_residual(x, filters, strides, expansion, path):
    channels = x.shape[-1]
    hidden = channels * expansion
    y = _layers.conv(x, hidden, 1, name=f"{path}.conv.0")
    y = _layers.batch_norm(y, name=f"{path}.conv.1")
    y = _layers.relu(y, name=f"{path}.conv.2")
    y = _layers.depthwise_conv(y, 3, strides=strides, padding=1,
                               name=f"{path}.conv.3")
    y = _layers.batch_norm(y, name=f"{path}.conv.4")
    y = _layers.relu(y, name=f"{path}.conv.5")
    y = _layers.conv(y, filters, 1, name=f"{path}.conv.6")
    y = _layers.batch_norm(y, name=f"{path}.conv.7")
    if strides == 1 and channels == filters:
        y = keras.layers.Add(name=f"{path}.add")([x, y])
    return y


def mobilenetv2(num_classes=100, *, name=None):
    """MobileNetV2 at half width with expansion 6, for 32x32 images.

    mdistiller's `mobile_half`; 812,836 trainable parameters with 100
    classes. The layers and named outputs (`"stem"`, `"stage1"` to
    `"stage4"`, `"stage1_preact"` to `"stage4_preact"`, which equal the
    stages, and `"pooled"`) are described in
    `keras_kd.models.cifar.mobilenetv2`.

    Args:
        num_classes: the number of logits.
        name: the model's name; `"mobilenetv2"` by default.

    Returns:
        A Functional `keras.Model` from `(32, 32, 3)` images (channels
        last) to `num_classes` logits.

    Example:

    ```python
    import keras
    from keras_kd.models import cifar

    model = cifar.mobilenetv2()
    stage2 = keras.Model(model.inputs, model.get_layer("stage2").output)
    ```
    """
    width = 0.5
    inputs = keras.Input((32, 32, 3), name="image")
    x = _layers.conv(inputs, int(32 * width), 3, strides=2, padding=1,
                     name="conv1.0")
    x = _layers.batch_norm(x, name="conv1.1")
    x = _layers.relu(x, name="stem")
    stage = 0
    for group, (expansion, filters, blocks, strides) in enumerate(_GROUPS):
        for block in range(blocks):
            x = _inverted_residual(
                x, int(filters * width), strides if block == 0 else 1,
                expansion, f"blocks.{group}.{block}")
        if group in _STAGE_ENDS:
            stage += 1
            x = keras.layers.Identity(name=f"stage{stage}_preact")(x)
            x = keras.layers.Identity(name=f"stage{stage}")(x)
    # The reference widens the last convolution only above width 1.
    x = _layers.conv(x, 1280, 1, name="conv2.0")
    x = _layers.batch_norm(x, name="conv2.1")
    x = _layers.relu(x, name="conv2.2")
    # `nn.AvgPool2d(2, ceil_mode=True)` on the 2x2 map.
    x = keras.layers.AveragePooling2D(2, name="avgpool")(x)
    x = keras.layers.Flatten(name="pooled")(x)
    outputs = keras.layers.Dense(num_classes, name="classifier.0")(x)
    return keras.Model(inputs, outputs, name=name or "mobilenetv2")
