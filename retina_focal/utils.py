"""Small helpers shared by the registries of retina_focal."""
from detectron2.utils.registry import Registry


def get_registered(registry: Registry, name: str, cfg_key: str):
    """Return ``registry``'s entry ``name``; the error names ``cfg_key`` and lists the choices."""
    if name not in registry:
        raise KeyError(
            f"{cfg_key}={name!r} is not registered in {registry._name}; registered: "
            f"{sorted(k for k, _ in registry)}"
        )
    return registry.get(name)
