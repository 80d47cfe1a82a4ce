"""A wheel (``pip wheel --no-deps .``) holds the configs, and a non-editable install of it finds
them from another working directory: model_zoo, train_net.py's --config-file and
retina-focal-predict's."""
import glob
import os
import subprocess
import sys
import zipfile

import cv2
import numpy as np
import pytest

from retina_focal import model_zoo

from tests.conftest import REPO

pytestmark = pytest.mark.slow

R18 = "Shapes-Detection/retina_focal_R_18_FPN_demo.yaml"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel, and a folder where it is installed (``pip install --target``, not editable)."""
    wheels, target = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), REPO],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = glob.glob(os.path.join(wheels, "retina_focal-*.whl"))
    install = subprocess.run(pip + ["install", "--no-deps", "--target", str(target), wheel],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    return wheel, str(target)


def test_the_wheel_holds_every_config(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in model_zoo.available_configs() + ["Ablations/paper_results.csv", "common/models/retina_focal.py"]:
        assert f"retina_focal/model_zoo/configs/{name}" in names, name


def _run(code_or_args, target, cwd):
    env = dict(os.environ, PYTHONPATH=target)  # the installed copy, not the checkout
    return subprocess.run([sys.executable, *code_or_args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_an_installed_package_finds_its_configs_from_another_directory(installed, tmp_path):
    _, target = installed
    code = (f"import retina_focal; from retina_focal import model_zoo; print(retina_focal.__file__); "
            f"print(model_zoo.get_config_file({R18!r})); print(model_zoo.get_config({R18!r}).MODEL.META_ARCHITECTURE)")
    out = _run(["-c", code], target, tmp_path)
    package, path, arch = out.stdout.split()
    assert package.startswith(target) and path.startswith(target) and os.path.isfile(path), out.stderr
    assert arch == "RetinaFocal"


def test_train_net_and_predict_take_a_config_name_from_another_directory(installed, tmp_path):
    _, target = installed
    script = tmp_path / "train_net.py"  # a copy: run from the checkout, it would import the checkout's package
    script.write_text(open(os.path.join(REPO, "train_net.py")).read())
    train = _run([str(script), "--config-file", R18, "--eval-only", "MODEL.WEIGHTS", "missing.pth"],
                 target, tmp_path)
    assert "MODEL.WEIGHTS 'missing.pth': no such file" in train.stderr, train.stderr[-3000:]
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "a.png"), np.zeros((64, 64, 3), np.uint8))
    predict = _run(["-m", "retina_focal.predict", "--config-file", R18, "--input", str(tmp_path / "in"), "--output",
                    str(tmp_path / "out"), "MODEL.WEIGHTS", "missing.pth"], target, tmp_path)
    assert "MODEL.WEIGHTS 'missing.pth': no such file" in predict.stderr + predict.stdout, predict.stderr[-3000:]
