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
    env.pop("OMP_NUM_THREADS", None)  # as in a fresh shell, where torchrun would print its banner
    result = subprocess.run(["bash", str(ROOT / "demo.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"accuracy \d+\.\d%, Frechet distance \d+\.\d+", result.stdout), result.stdout[-2000:]
    assert "Setting OMP_NUM_THREADS" not in result.stderr  # torchrun's banner: demo.sh sets the variable
    grid = Image.open(tmp_path / "out" / "digits.png")
    assert grid.size == (10 * 10 + 2, 10 * 10 + 2)  # 10 x 10 digits of 8x8 with 2-pixel padding
    checkpoints = list((tmp_path / "out").glob("*/checkpoints/*.pt"))
    assert [c.name for c in checkpoints] == ["0000006.pt"]

    # Running it again resumes the finished run instead of training anew.
    again = subprocess.run(["bash", str(ROOT / "demo.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(list((tmp_path / "out").iterdir())) == 2  # the one experiment folder and the grid


def test_first_make_says_it_sets_up_the_environment_and_shows_pips_progress(tmp_path):
    """`make -n` prints the recipe without running it: the first `make demo` / `make test` announces the
    install, and pip's requirements install is not silenced (the pip upgrade still is)."""
    venv = tmp_path / "venv"
    result = subprocess.run(["make", "-n", f"VENV={venv}", "venv"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f'echo "setting up the environment (once) in {venv}"' in lines
    install = [line for line in lines if "pip install" in line]
    assert len(install) == 2 and "-q --upgrade pip" in install[0]
    assert install[1].endswith("pip install -r requirements.txt")
