"""The CIFAR ResNets, ResNet-18/50 and wide ResNets of
`keras_kd.models.cifar`, against the reference definitions, and the errors
of `load_torch_weights`.

The PyTorch side of these tests is `reference_resnet.py`, written after
mdistiller's `mdistiller/models/cifar/` (commit a08d46f) with the same
module paths and computation; the tests do not need mdistiller.
"""

import keras
import numpy as np
import pytest

from keras_kd.models import cifar

# Trainable-parameter counts of the reference models with 100 classes,
# computed once by running mdistiller's own definitions
# (mdistiller/models/cifar/resnet.py, resnetv2.py and wrn.py at commit
# a08d46f) with PyTorch 2.13:
# sum(p.numel() for p in m.parameters() if p.requires_grad) for
# m = resnet8(num_classes=100), ..., ResNet18(num_classes=100),
# ResNet50(num_classes=100), wrn_16_1(num_classes=100), ...
REFERENCE_PARAMETERS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "resnet18": 11_220_132,
    "resnet50": 23_705_252,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
}

# One model of each family and the block variants: projection shortcuts
# in the first stage (resnet8x4; resnet8, without, is imported by the
# tests of load_torch_weights below), several blocks per stage
# (resnet18), and the wide blocks with (wrn_16_2) and without (wrn_16_1)
# a projection in the first stage. The bottleneck blocks have a test of
# their own.
SMALL = ["resnet8x4", "resnet18", "wrn_16_1", "wrn_16_2"]


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def feature_names(model):
    """The named features of `model` in the reference's order: the stem,
    then each stage."""
    stages = 1
    while any(layer.name == f"stage{stages + 1}" for layer in model.layers):
        stages += 1
    names = [f"stage{i}" for i in range(1, stages + 1)]
    return ["stem", *names], ["stem", *(f"{n}_preact" for n in names)]


def images(batch=2, seed=0):
    return np.random.default_rng(seed).normal(
        size=(batch, 32, 32, 3)).astype("float32")


def to_torch_layout(array):
    # (batch, height, width, channels) -> (batch, channels, height, width)
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2))


def to_keras_layout(array):
    return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array


def reference(name, seed=0):
    """The PyTorch reference of `name`, with random weights and batch-norm
    statistics, in eval mode."""
    pytest.importorskip("torch")
    import reference_resnet

    return reference_resnet.randomized(
        reference_resnet.BUILDERS[name](100), seed)


def torch_outputs(model, x):
    import torch

    with torch.no_grad():
        logits, features = model(torch.from_numpy(to_torch_layout(x)))
    return logits.numpy(), features


def state_dict(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def assert_close(actual, expected):
    """Within 1e-4 of `expected`, relative to each value and to the
    largest magnitude of `expected` (rtol=1e-4, atol=1e-4 * max|expected|).
    """
    expected = np.asarray(expected)
    np.testing.assert_allclose(
        np.asarray(actual), expected, rtol=1e-4,
        atol=1e-4 * float(np.abs(expected).max()))


@pytest.mark.parametrize("name", list(REFERENCE_PARAMETERS))
def test_builds_like_the_reference(name):
    model = getattr(cifar, name)()
    assert model.name == name
    assert tuple(model.input.shape) == (None, 32, 32, 3)
    assert trainable_count(model) == REFERENCE_PARAMETERS[name]
    logits = model(images(), training=False)
    assert tuple(logits.shape) == (2, 100)
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(logits)))

    # The named features have the shapes of the reference's features (the
    # test is reported skipped here without PyTorch).
    torch_model = reference(name)
    assert sum(p.numel() for p in torch_model.parameters()) == (
        REFERENCE_PARAMETERS[name])
    _, features = torch_outputs(torch_model, images(batch=1))
    names, preact_names = feature_names(model)
    assert len(names) == len(features["feats"])
    for layer_names, key in ((names, "feats"), (preact_names, "preact_feats")):
        for layer_name, feature in zip(layer_names, features[key]):
            shape = to_keras_layout(feature.numpy()).shape[1:]
            assert tuple(model.get_layer(layer_name).output.shape) == (
                None, *shape), layer_name
    assert tuple(model.get_layer("pooled").output.shape) == (
        None, features["pooled_feat"].shape[1])


def test_num_classes_and_name():
    model = cifar.resnet8(num_classes=10, name="student")
    assert model.name == "student"
    assert tuple(model.output.shape) == (None, 10)
    # Only the classifier changes: 64 * (100 - 10) weights, 90 biases.
    expected = REFERENCE_PARAMETERS["resnet8"] - 65 * 90
    assert trainable_count(model) == expected


@pytest.mark.parametrize("name", ["resnet8", "resnet18", "wrn_16_1"])
def test_channels_last_whatever_the_image_data_format(name):
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        model = getattr(cifar, name)(num_classes=10)
    finally:
        keras.config.set_image_data_format(previous)
    assert tuple(model.input.shape) == (None, 32, 32, 3)
    assert tuple(model.get_layer("stage2").output.shape)[1:3] == (16, 16)
    assert tuple(model(images(), training=False).shape) == (2, 10)


@pytest.mark.parametrize("name", SMALL)
def test_checkpoint_import_computes_what_pytorch_computes(name, tmp_path):
    import torch

    torch_model = reference(name, seed=1)
    path = tmp_path / f"{name}.pth"
    # As mdistiller saves its teachers.
    torch.save({"model": torch_model.state_dict()}, path)
    model = getattr(cifar, name)()
    assert cifar.load_torch_weights(model, path) is model

    x = images()
    logits, features = torch_outputs(torch_model, x)
    names, preact_names = feature_names(model)
    outputs = keras.Model(
        model.input,
        [model.output]
        + [model.get_layer(n).output for n in names + preact_names]
        + [model.get_layer("pooled").output])(x, training=False)
    expected = ([logits] + features["feats"] + features["preact_feats"]
                + [features["pooled_feat"]])
    labels = ["logits", *names, *preact_names, "pooled"]
    assert len(outputs) == len(expected) == len(labels)
    actual = {}
    for label, output, wanted in zip(labels, outputs, expected):
        actual[label] = keras.ops.convert_to_numpy(output)
        try:
            assert_close(actual[label],
                         to_keras_layout(np.asarray(wanted)))
        except AssertionError as error:
            raise AssertionError(f"{label}: {error}") from None
    # The pre-activation features are not the activations.
    assert actual[preact_names[-1]].min() < 0


def test_bottleneck_checkpoint_import_computes_what_pytorch_computes():
    # ResNet-50's blocks, one per stage, to keep the test small; the full
    # model's structure is checked by the tests above.
    pytest.importorskip("torch")
    import reference_resnet
    from keras_kd.models.cifar import resnetv2

    torch_model = reference_resnet.randomized(reference_resnet.ResNet(
        reference_resnet.Bottleneck, (64, 64, 128, 256, 512), (1, 1, 1, 1),
        100, shortcut="shortcut", classifier="linear", adaptive_pool=True))
    model = resnetv2._resnet(resnetv2.bottleneck_block, (1, 1, 1, 1), 100,
                             "bottleneck")
    cifar.load_torch_weights(model, state_dict(torch_model))
    x = images()
    logits, _ = torch_outputs(torch_model, x)
    assert_close(keras.ops.convert_to_numpy(model(x, training=False)),
                 logits)


def randomize(model, seed=0):
    """Random values for every weight of `model`, batch-norm statistics
    included: kernels of variance 1 / fan-in, vectors in [0.5, 1.5] (so
    the moving variances are positive)."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        shape = tuple(weight.shape)
        if len(shape) > 1:
            value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        else:
            value = rng.uniform(0.5, 1.5, size=shape)
        weight.assign(value.astype(weight.dtype))
    return model


@pytest.mark.parametrize("name", ["resnet8", "resnet18", "wrn_16_2"])
def test_keras_file_round_trip(name, tmp_path):
    model = randomize(getattr(cifar, name)())
    x = images()
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.name == name
    assert [layer.name for layer in loaded.layers] == [
        layer.name for layer in model.layers]
    for a, b in zip(loaded.weights, model.weights):
        assert a.path == b.path
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                      keras.ops.convert_to_numpy(b))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x, training=False)), expected,
        rtol=1e-6, atol=1e-6 * np.abs(expected).max())


# load_torch_weights' errors and accepted checkpoint forms, on resnet8.


@pytest.fixture
def resnet8_state():
    return state_dict(reference("resnet8", seed=2))


def weights_of(model):
    return [keras.ops.convert_to_numpy(w).copy() for w in model.weights]


def assert_unchanged(model, before):
    for a, b in zip(weights_of(model), before):
        np.testing.assert_array_equal(a, b)


def test_a_missing_entry_is_named_and_nothing_is_loaded(resnet8_state):
    model = cifar.resnet8()
    before = weights_of(model)
    removed = resnet8_state.pop("layer2.0.bn2.running_var")
    with pytest.raises(KeyError, match=r"'layer2\.0\.bn2\.running_var'"):
        cifar.load_torch_weights(model, resnet8_state)
    assert_unchanged(model, before)
    resnet8_state["layer2.0.bn2.running_var"] = removed
    # A module with no entry at all.
    del resnet8_state["fc.weight"], resnet8_state["fc.bias"]
    with pytest.raises(KeyError, match=r"'fc\.weight'"):
        cifar.load_torch_weights(model, resnet8_state, strict=False)
    assert_unchanged(model, before)


def test_a_wrong_shape_names_the_entry_and_both_shapes(resnet8_state):
    model = cifar.resnet8()
    before = weights_of(model)
    resnet8_state["layer3.0.conv1.weight"] = np.zeros((64, 16, 3, 3),
                                                      "float32")
    with pytest.raises(ValueError) as info:
        cifar.load_torch_weights(model, resnet8_state)
    message = str(info.value)
    assert "'layer3.0.conv1.weight'" in message
    assert "(64, 16, 3, 3)" in message  # the checkpoint's
    assert "(64, 32, 3, 3)" in message  # the model's, in PyTorch's layout
    assert_unchanged(model, before)

    resnet8_state["layer3.0.conv1.weight"] = np.zeros((64, 32, 3, 3),
                                                      "float32")
    resnet8_state["fc.bias"] = np.zeros((10,), "float32")
    with pytest.raises(ValueError, match=r"'fc\.bias'.*\(10,\).*\(100,\)"):
        cifar.load_torch_weights(model, resnet8_state)
    assert_unchanged(model, before)


def test_an_unused_entry_fails_only_when_strict(resnet8_state):
    torch_logits, _ = torch_outputs(reference("resnet8", seed=2), images())
    model = cifar.resnet8()
    before = weights_of(model)
    resnet8_state["layer4.0.conv1.weight"] = np.zeros((8, 8, 3, 3),
                                                      "float32")
    with pytest.raises(ValueError, match=r"'layer4\.0\.conv1\.weight'"):
        cifar.load_torch_weights(model, resnet8_state)
    assert_unchanged(model, before)

    cifar.load_torch_weights(model, resnet8_state, strict=False)
    assert_close(keras.ops.convert_to_numpy(model(images(), training=False)),
                 torch_logits)


def test_checkpoint_forms(resnet8_state, tmp_path):
    import torch

    torch_logits, _ = torch_outputs(reference("resnet8", seed=2), images())
    # A file with a bare state dict whose keys come from nn.DataParallel.
    path = tmp_path / "parallel.pth"
    torch.save({f"module.{k}": torch.from_numpy(v)
                for k, v in resnet8_state.items()}, path)
    # A dict holding the state dict under "state_dict".
    for checkpoint in (path, {"state_dict": resnet8_state}):
        model = cifar.load_torch_weights(cifar.resnet8(), checkpoint)
        assert_close(
            keras.ops.convert_to_numpy(model(images(), training=False)),
            torch_logits)


def test_module_paths_that_differ_only_by_dot_and_underscore(resnet8_state):
    # Both would be the Keras layer "layer1_0_conv1".
    resnet8_state["layer1_0.conv1.weight"] = resnet8_state[
        "layer1.0.conv1.weight"]
    with pytest.raises(ValueError, match=r"'layer1\.0\.conv1\.weight'.*"
                       r"'layer1_0\.conv1\.weight'"):
        cifar.load_torch_weights(cifar.resnet8(), resnet8_state)


def test_a_checkpoint_file_without_pytorch_says_what_to_install(
        monkeypatch, tmp_path):
    import sys

    model = cifar.resnet8()
    before = [w.copy() for w in model.get_weights()]
    # `import torch` raises ImportError while the entry is None.
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install torch"):
        cifar.load_torch_weights(model, tmp_path / "teacher.pth")
    monkeypatch.undo()
    assert all(np.array_equal(a, b)
               for a, b in zip(before, model.get_weights()))
