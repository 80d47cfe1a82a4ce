"""retina_focal.model_zoo and MODEL_ZOO.md: names resolve to the configs shipped in the package
(the checkout's configs/ links to them), from a checkout and from a wheel install."""
import os
import re
import subprocess
import sys

import pytest

from retina_focal import model_zoo

from tests.conftest import REPO

R50 = "COCO-Detection/retina_focal_R_50_FPN_1x.yaml"


def test_get_config_file_is_the_packaged_file_that_the_checkout_links():
    path = model_zoo.get_config_file(R50)
    assert path == os.path.join(REPO, "retina_focal", "model_zoo", "configs", R50)
    assert os.path.samefile(path, os.path.join(REPO, "configs", R50))


@pytest.mark.parametrize("given", [R50, "configs/" + R50])
def test_find_config_file_takes_a_name_from_any_directory(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert model_zoo.find_config_file(given) == model_zoo.get_config_file(R50)


def test_find_config_file_prefers_a_file_and_names_both_places_when_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "COCO-Detection" / "retina_focal_R_50_FPN_1x.yaml"
    own.parent.mkdir()
    own.write_text("_BASE_: x")
    assert model_zoo.find_config_file(R50) == R50  # the user's file, not the packaged one
    with pytest.raises(FileNotFoundError, match=r"'my\.yaml': no such file \(from .*\), and no packaged config"):
        model_zoo.find_config_file("my.yaml")


def test_get_config_has_the_file_and_the_plugin_keys():
    cfg = model_zoo.get_config(R50)
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.META_ARCHITECTURE == "RetinaFocal"
    assert cfg.MODEL.RETINA_FOCAL.HEAD_NAME == "RetinaFocalHead"  # from add_retina_focal_config
    assert cfg.OUTPUT_DIR == "output/retina_focal_R_50_FPN_1x"


@pytest.mark.parametrize("name", ["COCO-Detection/retina_focal_R_50_FPN_3x.yaml", "retina_focal_R_50_FPN_1x", ""])
def test_unknown_name_lists_the_available_ones(name):
    with pytest.raises(FileNotFoundError, match=re.escape(f"no config {name!r}")) as e:
        model_zoo.get_config_file(name)
    assert R50 in str(e.value) and "Shapes-Detection/retina_focal_R_18_FPN_demo.yaml" in str(e.value)


@pytest.mark.slow
def test_works_from_another_directory(tmp_path):
    """As an editable install is used: imported from elsewhere, the path is still the checkout's."""
    code = f"from retina_focal import model_zoo; print(model_zoo.get_config_file({R50!r}))"
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert os.path.samefile(out.stdout.strip(), os.path.join(REPO, "configs", R50)), out.stderr


def _model_zoo_md() -> str:
    with open(os.path.join(REPO, "MODEL_ZOO.md")) as f:
        return f.read()


def test_model_zoo_md_links_existing_configs_only():
    linked = set(re.findall(r"\]\(configs/([^)]+\.yaml)\)", _model_zoo_md()))
    assert R50 in linked
    for name in linked:
        model_zoo.get_config_file(name)  # raises for a config that does not exist


def test_model_zoo_md_eval_commands_name_existing_configs():
    commands = re.findall(r"`(python train_net\.py --eval-only [^`]+)`", _model_zoo_md())
    assert len(commands) == 3
    for command in commands:
        config = re.search(r"--config-file configs/(\S+)", command).group(1)
        model_zoo.get_config_file(config)
        url = r"https://dl\.fbaipublicfiles\.com/detectron2/COCO-Detection/retinanet_R_\d+_FPN_\dx/\d+/model_final_[0-9a-f]+\.pkl"
        assert re.search(r"MODEL\.WEIGHTS " + url, command)
