import pytest

import keras_kd


def test_plot_diagnostics_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    run = {"loss": [1.0, 0.8], "top1_agreement": [0.5, 0.7],
           "val_top1_agreement": [0.4, 0.6], "attention_iou_a_b": [0.3, 0.2],
           "mutual_information": [0.1, 0.2]}
    path = keras_kd.plot_diagnostics(run, str(tmp_path / "one.png"))
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 100
    # Several runs on shared panels; an explicit key list.
    path = keras_kd.plot_diagnostics({"weak": run, "strong": run},
                                     str(tmp_path / "two.png"),
                                     names=["top1_agreement"])
    assert matplotlib.image.imread(path).shape[0] > 100
    with pytest.raises(ValueError, match="No diagnostic"):
        keras_kd.plot_diagnostics({"loss": [1.0]}, str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="'ece' is not in the history"):
        keras_kd.plot_diagnostics(run, str(tmp_path / "x.png"), names=["ece"])
