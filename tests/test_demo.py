"""A short version of the built-in demo (demo.sh, run by `make demo`) runs end to end."""
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT


@pytest.mark.slow
def test_short_demo_end_to_end(tmp_path):
    env = dict(os.environ, DEMO_STEPS="6", DEMO_OUT=str(tmp_path / "out"), DEMO_DATA=str(tmp_path / "digits"),
               DEMO_PER_CLASS="3", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    result = subprocess.run(["bash", str(ROOT / "demo.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"accuracy \d+\.\d%, Frechet distance \d+\.\d+", result.stdout), result.stdout[-2000:]
    grid = Image.open(tmp_path / "out" / "digits.png")
    assert grid.size == (10 * 10 + 2, 10 * 10 + 2)  # 10 x 10 digits of 8x8 with 2-pixel padding
    checkpoints = list((tmp_path / "out").glob("*/checkpoints/*.pt"))
    assert [c.name for c in checkpoints] == ["0000006.pt"]

    # Running it again resumes the finished run instead of training anew.
    again = subprocess.run(["bash", str(ROOT / "demo.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(list((tmp_path / "out").iterdir())) == 2  # the one experiment folder and the grid
