import json
import os
import subprocess
import sys

import numpy as np


def test_mirrored_strategy_matches_single_device():
    script = os.path.join(os.path.dirname(__file__), "mirrored_check.py")
    proc = subprocess.run([sys.executable, script], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    out = json.loads(line[-1][len("RESULT"):])
    assert out["replicas"] == 2
    for phase in ("eval", "fit"):
        single, mirrored = out[f"single_{phase}"], out[f"mirrored_{phase}"]
        assert set(single) == set(mirrored)
        for key in single:
            np.testing.assert_allclose(mirrored[key], single[key], rtol=1e-4,
                                       err_msg=f"{phase} {key}")
    assert out["max_weight_diff"] < 1e-5
    assert out["teacher_unchanged"]
