"""retina_focal/modeling/losses/registry.py: losses are chosen by config, unknown names listed."""
import pytest

from retina_focal.modeling.losses import FocalLoss, build_retina_focal_loss
from tests.conftest import small_cfg

def test_loss_is_chosen_by_config_with_its_parameters():
    loss = build_retina_focal_loss(small_cfg("MODEL.RETINANET.FOCAL_LOSS_GAMMA", 1.5, "MODEL.RETINANET.FOCAL_LOSS_ALPHA", 0.5))
    assert isinstance(loss, FocalLoss) and (loss.alpha, loss.gamma) == (0.5, 1.5)
    with pytest.raises(KeyError, match="FocalLoss"):
        build_retina_focal_loss(small_cfg("MODEL.RETINA_FOCAL.LOSS.NAME", "Nope"))
    with pytest.raises(ValueError, match="FOCAL_LOSS_ALPHA"):
        FocalLoss(alpha=1.5, gamma=2.0)
    with pytest.raises(ValueError, match="FOCAL_LOSS_GAMMA"):
        FocalLoss(alpha=0.25, gamma=-2.0)
