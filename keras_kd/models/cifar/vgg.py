"""VGG with batch normalization, in its CIFAR-100 form.

The CIFAR form of "Very Deep Convolutional Networks for Large-Scale Image
Recognition" (Simonyan and Zisserman, arXiv:1409.1556) that mdistiller
defines (`mdistiller/models/cifar/vgg.py`, the `vgg*_bn` variants) and that
the distillation literature's CIFAR-100 tables call `vgg8` ... `vgg19`.

Five blocks of 3x3 convolutions (with bias), each followed by batch
normalization and a ReLU; the last ReLU of a block is applied after the
block. A 2x2 max pooling follows blocks 0, 1 and 2 (on a 32x32 input the
reference skips the pooling after block 3), so the blocks see 32, 16, 8, 4
and 4 pixels. A global average pooling and the linear `"classifier"`
follow.

Named outputs (mdistiller's `feats`, `preact_feats` and `pooled_feat`):

- `"stem"`: block 0 after its ReLU, `(32, 32, 64)`; the reference's first
  `feats` and also its first `preact_feats`;
- `"stage1"` ... `"stage4"`: blocks 1 to 4 after their ReLU;
- `"stage1_preact"` ... `"stage4_preact"`: the same before that ReLU (the
  output of the block's last batch normalization);
- `"pooled"`: the 512 averaged features that the classifier reads.

Layers that hold weights carry the PyTorch module paths of the reference:
`"block1.0"` is the first convolution of block 1, `"block1.1"` its batch
normalization, `"block1.3"` its second convolution (index 2 is a ReLU).
"""

import keras

from keras_kd.models.cifar import _layers

# Output channels of the convolutions of blocks 0 to 4.
_CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
              (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256),
              (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _block(x, widths, index):
    """Block `index`: conv, BN and ReLU for each width, without the last
    ReLU (PyTorch `nn.Sequential` indices 3k, 3k + 1, 3k + 2)."""
    for k, width in enumerate(widths):
        if k:
            x = _layers.relu(x, name=f"block{index}.{3 * k - 1}")
        x = _layers.conv(x, width, 3, padding=1, use_bias=True,
                         name=f"block{index}.{3 * k}")
        x = _layers.batch_norm(x, name=f"block{index}.{3 * k + 1}")
    return x


def _vgg(config, num_classes, name):
    widths = _CONFIGS[config]
    inputs = keras.Input((32, 32, 3), name="image")
    x = _block(inputs, widths[0], 0)
    x = _layers.relu(x, name="stem")
    for index in range(1, 5):
        if index <= 3:
            x = keras.layers.MaxPooling2D(2, name=f"pool{index - 1}")(x)
        x = _block(x, widths[index], index)
        x = keras.layers.Identity(name=f"stage{index}_preact")(x)
        x = _layers.relu(x, name=f"stage{index}")
    x = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
    outputs = keras.layers.Dense(num_classes, name="classifier")(x)
    return keras.Model(inputs, outputs, name=name or config)


def vgg8(num_classes=100, *, name=None):
    """VGG-8 with batch normalization, for 32x32 images.

    mdistiller's `vgg8_bn`: 5 convolutions in five blocks and the
    classifier; 3,965,028 trainable parameters with 100 classes. The
    layers and named outputs (`"stem"`, `"stage1"` to `"stage4"`,
    `"stage1_preact"` to `"stage4_preact"`, `"pooled"`) are described in
    `keras_kd.models.cifar.vgg`.

    Args:
        num_classes: the number of logits.
        name: the model's name; `"vgg8"` by default.

    Returns:
        A Functional `keras.Model` from `(32, 32, 3)` images (channels
        last) to `num_classes` logits.

    Example:

    ```python
    import keras
    from keras_kd.models import cifar

    model = cifar.vgg8()
    stage2 = keras.Model(model.inputs, model.get_layer("stage2").output)
    ```
    """
    return _vgg("vgg8", num_classes, name)


def vgg11(num_classes=100, *, name=None):
    """VGG-11 with batch normalization, for 32x32 images.

    mdistiller's `vgg11_bn`: 8 convolutions in five blocks and the
    classifier; 9,277,284 trainable parameters with 100 classes. The
    layers and named outputs (`"stem"`, `"stage1"` to `"stage4"`,
    `"stage1_preact"` to `"stage4_preact"`, `"pooled"`) are described in
    `keras_kd.models.cifar.vgg`.

    Args:
        num_classes: the number of logits.
        name: the model's name; `"vgg11"` by default.

    Returns:
        A Functional `keras.Model` from `(32, 32, 3)` images (channels
        last) to `num_classes` logits.

    Example:

    ```python
    import keras
    from keras_kd.models import cifar

    model = cifar.vgg11()
    stage2 = keras.Model(model.inputs, model.get_layer("stage2").output)
    ```
    """
    return _vgg("vgg11", num_classes, name)


def vgg13(num_classes=100, *, name=None):
    """VGG-13 with batch normalization, for 32x32 images.

    mdistiller's `vgg13_bn`: 10 convolutions in five blocks and the
    classifier; 9,462,180 trainable parameters with 100 classes. The
    layers and named outputs (`"stem"`, `"stage1"` to `"stage4"`,
    `"stage1_preact"` to `"stage4_preact"`, `"pooled"`) are described in
    `keras_kd.models.cifar.vgg`.

    Args:
        num_classes: the number of logits.
        name: the model's name; `"vgg13"` by default.

    Returns:
        A Functional `keras.Model` from `(32, 32, 3)` images (channels
        last) to `num_classes` logits.

    Example:

    ```python
    import keras
    from keras_kd.models import cifar

    model = cifar.vgg13()
    stage2 = keras.Model(model.inputs, model.get_layer("stage2").output)
    ```
    """
    return _vgg("vgg13", num_classes, name)


def vgg16(num_classes=100, *, name=None):
    """VGG-16 with batch normalization, for 32x32 images.

    mdistiller's `vgg16_bn`: 13 convolutions in five blocks and the
    classifier; 14,774,436 trainable parameters with 100 classes. The
    layers and named outputs (`"stem"`, `"stage1"` to `"stage4"`,
    `"stage1_preact"` to `"stage4_preact"`, `"pooled"`) are described in
    `keras_kd.models.cifar.vgg`.

    Args:
        num_classes: the number of logits.
        name: the model's name; `"vgg16"` by default.

    Returns:
        A Functional `keras.Model` from `(32, 32, 3)` images (channels
        last) to `num_classes` logits.

    Example:

    ```python
    import keras
    from keras_kd.models import cifar

    model = cifar.vgg16()
    stage2 = keras.Model(model.inputs, model.get_layer("stage2").output)
    ```
    """
    return _vgg("vgg16", num_classes, name)


def vgg19(num_classes=100, *, name=None):
    """VGG-19 with batch normalization, for 32x32 images.

    mdistiller's `vgg19_bn`: 16 convolutions in five blocks and the
    classifier; 20,086,692 trainable parameters with 100 classes. The
    layers and named outputs (`"stem"`, `"stage1"` to `"stage4"`,
    `"stage1_preact"` to `"stage4_preact"`, `"pooled"`) are described in
    `keras_kd.models.cifar.vgg`.

    Args:
        num_classes: the number of logits.
        name: the model's name; `"vgg19"` by default.

    Returns:
        A Functional `keras.Model` from `(32, 32, 3)` images (channels
        last) to `num_classes` logits.

    Example:

    ```python
    import keras
    from keras_kd.models import cifar

    model = cifar.vgg19()
    stage2 = keras.Model(model.inputs, model.get_layer("stage2").output)
    ```
    """
    return _vgg("vgg19", num_classes, name)
