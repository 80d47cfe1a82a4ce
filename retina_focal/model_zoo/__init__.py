"""The configs, shipped inside the package (``model_zoo/configs``), by name."""
from retina_focal.model_zoo.model_zoo import (
    CONFIG_ROOT,
    available_configs,
    find_config_file,
    get_config,
    get_config_file,
)

__all__ = ["CONFIG_ROOT", "available_configs", "find_config_file", "get_config_file", "get_config"]
