"""Training on several devices or workers gives the results of one.

Each check runs in processes of its own (`mirrored_check.py`,
`distribute_check.py`): devices and workers must be configured before the
backend initialises.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(__file__)


def _run(args, env=None, timeout=900):
    return subprocess.run([sys.executable, *args], capture_output=True,
                          text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def _result(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    return json.loads(line[-1][len("RESULT"):])


@pytest.mark.backends("tensorflow")
def test_mirrored_strategy_matches_single_device():
    out = _result(_run([os.path.join(HERE, "mirrored_check.py")]))
    assert out["replicas"] == 2
    for phase in ("eval", "fit"):
        single, mirrored = out[f"single_{phase}"], out[f"mirrored_{phase}"]
        assert set(single) == set(mirrored)
        for key in single:
            np.testing.assert_allclose(mirrored[key], single[key], rtol=1e-4,
                                       err_msg=f"{phase} {key}")
    assert out["max_weight_diff"] < 1e-5
    assert out["teacher_unchanged"]
    # A masked, chunked token divergence: the mean over the global batch's
    # tokens, though the two replicas hold 18 and 93 real tokens.
    single, mirrored = out["single_lm_fit"], out["mirrored_lm_fit"]
    assert set(single) == set(mirrored) == {"loss", "forward_kl_loss"}
    for key in single:
        np.testing.assert_allclose(mirrored[key], single[key], rtol=1e-5,
                                   err_msg=f"token divergence {key}")
    assert out["lm_max_weight_diff"] < 1e-6


@pytest.mark.backends("jax")
def test_jax_data_parallel_matches_one_device():
    out = _result(_run([os.path.join(HERE, "distribute_check.py"),
                        "jax_data_parallel"]))
    assert out["devices"] == 2
    assert out["shards"] == 2  # the variables live on both devices
    single, parallel = out["single"], out["parallel"]
    assert set(single) == set(parallel)
    for key in single:
        np.testing.assert_allclose(parallel[key], single[key], rtol=1e-4,
                                   atol=1e-6, err_msg=key)
    assert out["max_weight_diff"] < 1e-5


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.backends("tensorflow")
def test_multi_worker_mirrored_strategy_matches_one_worker(tmp_path):
    script = os.path.join(HERE, "distribute_check.py")
    single = tmp_path / "single.npz"
    reference = _run([script, "tf_worker", str(single)],
                      env={"TF_CONFIG": ""})
    assert reference.returncode == 0, reference.stderr[-3000:]
    workers = [f"localhost:{port}" for port in _free_ports(2)]
    procs = []
    for index in range(2):
        config = {"cluster": {"worker": workers},
                  "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CONFIG=json.dumps(config))
        procs.append(subprocess.Popen(
            [sys.executable, script, "tf_worker",
             str(tmp_path / f"worker{index}.npz")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
    with np.load(single) as ref:
        assert int(ref["replicas"]) == 1
        for index in range(2):
            with np.load(tmp_path / f"worker{index}.npz") as got:
                assert int(got["replicas"]) == 2
                assert list(got["keys"]) == list(ref["keys"])
                np.testing.assert_allclose(got["logs"], ref["logs"],
                                           rtol=1e-4, atol=1e-6)
                assert list(got["lm_keys"]) == list(ref["lm_keys"])
                np.testing.assert_allclose(got["lm_logs"], ref["lm_logs"],
                                           rtol=1e-5, atol=1e-7)
                names = [k for k in ref.files if k.startswith(("w", "lmw"))]
                assert any(n.startswith("lmw") for n in names)
                for name in names:
                    np.testing.assert_allclose(got[name], ref[name],
                                               atol=1e-5, err_msg=name)
