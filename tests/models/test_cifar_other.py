"""The CIFAR VGGs, MobileNetV2 and ShuffleNets of `keras_kd.models.cifar`
against the reference definitions: parameter counts, named features,
PyTorch checkpoints and `.keras` files.

The PyTorch side of these tests is `reference_other.py`, written after
mdistiller's `mdistiller/models/cifar/` (commit a08d46f) with the same
module paths and computation; the tests do not need mdistiller.
"""

import functools
import json
import zipfile

import keras
import numpy as np
import pytest

from keras_kd.models import cifar

# Trainable parameters with 100 classes, of mdistiller's definitions
# (`mdistiller/models/cifar/` at commit a08d46f: `vgg.py` `vgg*_bn`,
# `mobilenetv2.py` `mobile_half(100)`, `ShuffleNetv1.py` `ShuffleV1`,
# `ShuffleNetv2.py` `ShuffleV2`), counted once by running that code with
# PyTorch 2.13: `sum(p.numel() for p in m.parameters() if p.requires_grad)`.
REFERENCE_PARAMETERS = {
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "mobilenetv2": 812_836,
    "shufflenet_v1": 949_258,
    "shufflenet_v2": 1_355_528,
}
ARCHITECTURES = sorted(REFERENCE_PARAMETERS)
# One or two of each family: the import checks every named feature.
IMPORTED = ["vgg8", "vgg13", "mobilenetv2", "shufflenet_v1",
            "shufflenet_v2"]
# One of each file; ShuffleNet V2 holds the channel split and shuffle.
ROUND_TRIP = ["vgg8", "mobilenetv2", "shufflenet_v2"]


@functools.lru_cache(maxsize=None)
def built(name):
    """One model per architecture, built once: building costs seconds on
    JAX (each variable's initializer is compiled for its shape). The tests
    that use it need no particular weights."""
    return getattr(cifar, name)()


def images(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, 32, 32, 3)).astype("float32")


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def modules_in(config):
    """The `"module"` of every serialized object in a `.keras` config."""
    if isinstance(config, dict):
        if isinstance(config.get("module"), str):
            yield config["module"]
        for value in config.values():
            yield from modules_in(value)
    elif isinstance(config, list):
        for value in config:
            yield from modules_in(value)


def trainable_parameters(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_builds_with_the_reference_parameter_count(name):
    model = built(name)
    assert model.name == name
    assert trainable_parameters(model) == REFERENCE_PARAMETERS[name]
    logits = numpy(model(images(), training=False))
    assert logits.shape == (2, 100)
    assert np.all(np.isfinite(logits))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_named_features_have_the_reference_shapes(name):
    torch = pytest.importorskip("torch")
    from reference_other import build

    with torch.no_grad():
        _, features = build(name).eval()(torch.zeros(1, 3, 32, 32))
    model = built(name)
    names = {layer.name for layer in model.layers}
    stages = sum(key.startswith("stage") and "_" not in key
                 for key in features)
    assert f"stage{stages + 1}" not in names
    for key, value in features.items():
        shape = tuple(value.shape[1:])
        if len(shape) == 3:  # PyTorch's channels first
            shape = shape[1:] + shape[:1]
        assert model.get_layer(key).output.shape[1:] == shape, key


@pytest.mark.parametrize("name", IMPORTED)
def test_torch_checkpoint_gives_the_reference_outputs(name, tmp_path):
    """Logits and every named feature after `load_torch_weights` equal a
    PyTorch forward of the reference with the same random weights and
    batch-norm statistics: `assert_allclose` with rtol 1e-4 and atol 1e-4
    times the largest absolute value of the compared tensor."""
    torch = pytest.importorskip("torch")
    from reference_other import build, randomize

    reference = randomize(build(name), seed=3)
    path = tmp_path / f"{name}.pth"
    torch.save({"model": reference.state_dict()}, path)
    x = images(seed=4)
    with torch.no_grad():
        logits, features = reference(
            torch.from_numpy(x.transpose(0, 3, 1, 2)))

    model = cifar.load_torch_weights(built(name), path)
    keys = sorted(features)
    tap = keras.Model(model.input,
                      [model.output] + [model.get_layer(k).output
                                        for k in keys])
    ours = [numpy(t) for t in tap(x, training=False)]
    expected = [logits.numpy()] + [
        features[k].numpy().transpose(0, 2, 3, 1) if features[k].ndim == 4
        else features[k].numpy() for k in keys]
    for label, got, want in zip(["logits"] + keys, ours, expected):
        assert got.shape == want.shape, label
        np.testing.assert_allclose(got, want, rtol=1e-4,
                                   atol=1e-4 * np.abs(want).max(),
                                   err_msg=label)
    # The check can fail: the two images give different logits.
    assert np.abs(expected[0][0] - expected[0][1]).max() > 1e-2 * np.abs(
        expected[0]).max()


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_keras_file_round_trip(name, tmp_path):
    model = getattr(cifar, name)(num_classes=10, name="student")
    assert model.name == "student"
    assert model.input.shape == (None, 32, 32, 3)
    assert model.output.shape == (None, 10)
    rng = np.random.default_rng(5)
    # Batch-norm statistics away from their initial values, so that a
    # file that lost them gives other outputs.
    for variable in model.non_trainable_weights:
        variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype(
            "float32"))
    path = tmp_path / f"{name}.keras"
    model.save(path)
    # Only Keras' own classes, so that the file loads without keras-kd.
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    modules = set(modules_in(config))
    assert modules and all(m.split(".")[0] == "keras" for m in modules), (
        modules)
    loaded = keras.models.load_model(path)
    assert loaded.name == "student"
    names = ["pooled", "stage2", "stage2_preact"]
    ours, theirs = (
        keras.Model(m.input, [m.output] + [m.get_layer(n).output
                                           for n in names])
        for m in (model, loaded))
    x = images(seed=6)
    for label, got, want in zip(["logits"] + names,
                                ours(x, training=False),
                                theirs(x, training=False)):
        np.testing.assert_allclose(numpy(got), numpy(want), rtol=1e-6,
                                   atol=1e-6, err_msg=label)


@pytest.mark.parametrize("name", ["vgg8", "mobilenetv2", "shufflenet_v1",
                                  "shufflenet_v2"])
def test_channels_last_whatever_the_image_data_format(name):
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        model = getattr(cifar, name)(num_classes=10)
    finally:
        keras.config.set_image_data_format(previous)
    assert tuple(model.input.shape) == (None, 32, 32, 3)
    assert tuple(model.get_layer("pooled").output.shape) == tuple(
        built(name).get_layer("pooled").output.shape)
    assert tuple(model(images(), training=False).shape) == (2, 10)
