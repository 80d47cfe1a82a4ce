"""Small helpers shared by the registries of retina_focal."""
from detectron2.utils.registry import Registry


def get_registered(registry: Registry, name: str, cfg_key: str):
    """Return ``registry``'s entry ``name``; the error names ``cfg_key`` and lists the choices."""
    if name not in registry:
        raise KeyError(
            f"{cfg_key}={name!r} is not registered in {_registry_name(registry)}; registered: "
            f"{sorted(k for k, _ in registry)}"
        )
    return registry.get(name)


def _registry_name(registry: Registry) -> str:
    """The registry's name, e.g. "RETINA_FOCAL_HEAD": fvcore's ``Registry`` keeps it only in
    the private ``_name`` (read, never written)."""
    return registry._name
