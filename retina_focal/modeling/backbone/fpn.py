"""FPN P3–P7 as RetinaNet builds it (§4, footnote 2), on any bottom-up network.

P3–P5 come from C3–C5 through 1×1 laterals and the top-down path (FPN), P6 is a 3×3
stride-2 conv on C5 (not on P5, and not a subsampling as in FPN), and P7 a 3×3 stride-2
conv applied after a ReLU on P6 (detectron2's ``LastLevelP6P7``). All levels have
``MODEL.FPN.OUT_CHANNELS`` (256) channels and strides 8…128.
"""
from detectron2.modeling.backbone import FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7

__all__ = ["build_p3_p7_fpn", "check_features_produced"]


def check_features_produced(key: str, names, produced, producer: str) -> None:
    """Raise an error naming ``key`` when one of its feature ``names`` is not in ``produced``
    (a backbone's ``output_shape()``); ``producer`` says whose outputs those are."""
    missing = [f for f in names if f not in produced]
    if missing:
        raise ValueError(f"{key} names {missing}, which {producer} does not produce; it produces {sorted(produced)}")


def build_p3_p7_fpn(cfg, bottom_up: Backbone, out_features_key: str) -> FPN:
    """FPN (``MODEL.FPN``) over ``bottom_up``'s ``MODEL.FPN.IN_FEATURES`` with P6 and P7 from
    ``MODEL.RETINA_FOCAL.P6_FROM``: ``"p5"`` (the FPN output P5, as FCOS does) or the name of
    any feature ``bottom_up`` produces (``"res5"``, C5, in the paper).

    Args:
        out_features_key (str): the config key that lists ``bottom_up``'s outputs, for errors.
    """
    produced = bottom_up.output_shape()
    in_features = cfg.MODEL.FPN.IN_FEATURES
    check_features_produced("MODEL.FPN.IN_FEATURES", in_features, produced, f"the bottom-up network ({out_features_key})")
    p6_from = cfg.MODEL.RETINA_FOCAL.P6_FROM
    if p6_from != "p5" and p6_from not in produced:
        raise ValueError(
            f"MODEL.RETINA_FOCAL.P6_FROM must be 'p5' or a feature of the bottom-up network {sorted(produced)} "
            f"({out_features_key}), got {p6_from!r}"
        )
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    p6_in_channels = out_channels if p6_from == "p5" else produced[p6_from].channels
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(p6_in_channels, out_channels, in_feature=p6_from),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
