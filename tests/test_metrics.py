"""The diagnostics used alone, against references outside the library
(scikit-learn, SciPy, NumPy)."""

import keras
import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import mutual_info_score

from keras_kd import metrics as kd_metrics
from keras_kd.metrics import (AttentionIoU, ExpectedCalibrationError,
                              MutualInformation, TeacherKL, TopOneAgreement)

C = 5


def batches(n_batches=3, size=40, seed=0, agree=0.6):
    """Teacher and student logits whose top-1 labels agree about `agree`
    of the time, so mutual information is clearly positive."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        t = rng.normal(size=(size, C)).astype("float32") * 2
        s = rng.normal(size=(size, C)).astype("float32") * 2
        copy = rng.random(size) < agree
        s[copy] = t[copy] + rng.normal(size=(copy.sum(), C)) * 0.3
        out.append((t, s))
    return out


def test_mutual_information_equals_sklearn_over_epoch():
    data = batches()
    # Batches with different label mixes: the epoch estimate is not the
    # mean of per-batch estimates, which the metric must not compute.
    data[0] = (data[0][0] + np.eye(C)[0] * 6, data[0][1] + np.eye(C)[0] * 6)
    metric = MutualInformation(num_classes=C)
    for t, s in data:
        metric.update_state(t, s)
    t_labels = np.concatenate([t.argmax(-1) for t, _ in data])
    s_labels = np.concatenate([s.argmax(-1) for _, s in data])
    expected = mutual_info_score(t_labels, s_labels)
    per_batch = np.mean([mutual_info_score(t.argmax(-1), s.argmax(-1))
                         for t, s in data])
    assert abs(expected - per_batch) > 1e-2  # the two readings differ here
    np.testing.assert_allclose(float(metric.result()), expected, rtol=1e-5)
    metric.reset_state()
    assert float(metric.result()) == 0.0


def test_mutual_information_weights_and_lazy_classes():
    (t, s), = batches(1, size=30, seed=3)
    w = np.random.default_rng(1).integers(0, 4, size=30)
    metric = MutualInformation()  # classes from the first batch
    metric.update_state(t, s, sample_weight=w.astype("float32"))
    assert metric.num_classes == C
    # Integer weights are repetitions of the samples.
    expected = mutual_info_score(np.repeat(t.argmax(-1), w),
                                 np.repeat(s.argmax(-1), w))
    np.testing.assert_allclose(float(metric.result()), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="counts 5 classes.*3"):
        metric.update_state(t[:, :3], s[:, :3])


def test_agreement_and_kl_equal_numpy():
    data = batches(seed=1)
    w = [np.random.default_rng(i).random(40).astype("float32")
         for i in range(3)]
    agreement, kl, kl_t = TopOneAgreement(), TeacherKL(), TeacherKL(3.0)
    for (t, s), wi in zip(data, w):
        agreement.update_state(t, s, sample_weight=wi)
        kl.update_state(t, s, sample_weight=wi)
        kl_t.update_state(t, s, sample_weight=wi)
    t = np.concatenate([d[0] for d in data]).astype("float64")
    s = np.concatenate([d[1] for d in data]).astype("float64")
    w = np.concatenate(w)
    same = (t.argmax(-1) == s.argmax(-1)).astype(float)
    np.testing.assert_allclose(float(agreement.result()),
                               np.average(same, weights=w), rtol=1e-5)
    for metric, tau in ((kl, 1.0), (kl_t, 3.0)):
        p, q = softmax(t / tau, -1), softmax(s / tau, -1)
        per_sample = np.sum(p * (np.log(p) - np.log(q)), -1)
        np.testing.assert_allclose(float(metric.result()),
                                   np.average(per_sample, weights=w),
                                   rtol=1e-4)


def numpy_ece(labels, logits, bins=15):
    probs = softmax(logits.astype("float64"), -1)
    conf, pred = probs.max(-1), probs.argmax(-1)
    total = 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(
                (pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return total


def test_ece_equals_numpy_binning():
    data = batches(seed=2)
    rng = np.random.default_rng(4)
    labels = [rng.integers(0, C, size=40) for _ in data]
    sparse, one_hot = ExpectedCalibrationError(), ExpectedCalibrationError(10)
    for (_, s), y in zip(data, labels):
        sparse.update_state(y, s)
        one_hot.update_state(np.eye(C)[y], s)
    s_all = np.concatenate([d[1] for d in data])
    y_all = np.concatenate(labels)
    np.testing.assert_allclose(float(sparse.result()),
                               numpy_ece(y_all, s_all, 15), rtol=1e-4)
    np.testing.assert_allclose(float(one_hot.result()),
                               numpy_ece(y_all, s_all, 10), rtol=1e-4)


def numpy_iou(maps_a, maps_b, threshold=0.4):
    inter = union = 0.0
    for a, b in zip(maps_a, maps_b):
        for x, y in zip(a, b):
            x = (x - x.min()) / (x.max() - x.min())
            y = (y - y.min()) / (y.max() - y.min())
            inter += np.sum((x >= threshold) & (y >= threshold))
            union += np.sum((x >= threshold) | (y >= threshold))
    return inter / union


def test_attention_iou_equals_numpy():
    rng = np.random.default_rng(5)
    maps_a = [rng.normal(size=(6, 8, 8)).astype("float32") for _ in range(3)]
    maps_b = [a + rng.normal(size=a.shape).astype("float32") for a in maps_a]
    iou, iou_high = AttentionIoU(), AttentionIoU(threshold=0.7)
    for a, b in zip(maps_a, maps_b):
        iou.update_state(a, b)
        iou_high.update_state(a[..., None], b[..., None])
    np.testing.assert_allclose(float(iou.result()),
                               numpy_iou(maps_a, maps_b), rtol=1e-5)
    np.testing.assert_allclose(float(iou_high.result()),
                               numpy_iou(maps_a, maps_b, 0.7), rtol=1e-5)
    identical = AttentionIoU()
    identical.update_state(maps_a[0], maps_a[0])
    assert float(identical.result()) == 1.0
    weighted = AttentionIoU()  # weight 0 drops an image, 2 counts it twice
    w = np.array([1, 0, 2, 1, 0, 1], "float32")
    weighted.update_state(maps_a[0], maps_b[0], sample_weight=w)
    repeat = np.repeat(np.arange(6), w.astype(int))
    np.testing.assert_allclose(
        float(weighted.result()),
        numpy_iou([maps_a[0][repeat]], [maps_b[0][repeat]]), rtol=1e-5)


def numpy_bilinear_resize(maps, size):
    """Bilinear resize of `(batch, height, width)` maps with half-pixel
    centres and clamped edges (as `tf.image.resize` and torch's
    `interpolate(align_corners=False)` upsample)."""
    def weights(n_in, n_out):
        centres = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        centres = np.clip(centres, 0, n_in - 1)
        low = np.floor(centres).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        frac = centres - low
        matrix = np.zeros((n_out, n_in))
        np.add.at(matrix, (np.arange(n_out), low), 1.0 - frac)
        np.add.at(matrix, (np.arange(n_out), high), frac)
        return matrix

    rows = weights(maps.shape[1], size[0])
    columns = weights(maps.shape[2], size[1])
    return np.einsum("oh,bhw,pw->bop", rows, maps, columns)


def test_class_activation_map_equals_numpy():
    rng = np.random.default_rng(6)
    feature = rng.normal(size=(3, 4, 4, 7)).astype("float32")
    kernel = rng.normal(size=(7, C)).astype("float32")
    cam = np.einsum("bhwk,kc->bhw", feature, kernel)  # summed over classes
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(
            kd_metrics.class_activation_map(feature, kernel)),
        cam, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(
            kd_metrics.class_activation_map(feature, kernel, size=(8, 8))),
        numpy_bilinear_resize(cam, (8, 8)), rtol=1e-4, atol=1e-5)


def test_config_round_trip_and_names():
    metrics = [TopOneAgreement(), TeacherKL(2.0), MutualInformation(7),
               ExpectedCalibrationError(12),
               AttentionIoU(("a", "b"), ("fa", "fb"), ("ca", "cb"), 0.5)]
    for metric in metrics:
        again = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(metric))
        assert type(again) is type(metric)
        assert again.get_config() == metric.get_config()
    assert metrics[-1].name == "attention_iou_a_b"
    assert isinstance(kd_metrics.get("mutual_information"), MutualInformation)
    with pytest.raises(ValueError, match="Unknown diagnostic 'agreement'"):
        kd_metrics.get("agreement")
    with pytest.raises(ValueError, match="`models` must be a pair"):
        AttentionIoU(models=("a", "b", "c"))
    with pytest.raises(ValueError, match="equal class counts"):
        TopOneAgreement().update_state(np.zeros((2, 3)), np.zeros((2, 4)))


@pytest.mark.parametrize("make, inputs", [
    (lambda **kw: TeacherKL(temperature=2.0, **kw), "logits"),
    (lambda **kw: ExpectedCalibrationError(num_bins=5, **kw), "labels"),
])
def test_from_logits_false_reads_probabilities(make, inputs):
    """On softmax outputs with `from_logits=False` the metric equals the
    metric of the logits; read as logits they give another value."""
    data = batches(seed=3)

    def run(metric, to_input):
        for t, s in data:
            first = s.argmax(-1) if inputs == "labels" else to_input(t)
            metric.update_state(first, to_input(s))
        return float(metric.result())

    def probabilities(z):
        return softmax(z, axis=-1).astype("float32")

    on_logits = run(make(), lambda z: z)
    on_probabilities = run(make(from_logits=False), probabilities)
    np.testing.assert_allclose(on_probabilities, on_logits, rtol=1e-4,
                               atol=1e-6)
    misread = run(make(), probabilities)
    assert abs(misread - on_logits) > 1e-2 * on_logits + 1e-3
    metric = make(from_logits=False)
    assert metric.reads_distribution is True
    clone = type(metric).from_config(metric.get_config())
    assert clone.from_logits is False


def test_top_class_metrics_do_not_read_distributions():
    assert kd_metrics.DistillationMetric.reads_distribution is False
    for metric in (TopOneAgreement(), MutualInformation(num_classes=C)):
        assert metric.reads_distribution is False
