"""Config: the ``MODEL.RETINA_FOCAL`` keys and the hook for a part's own keys (``defaults.py``),
and loading a config file with the datasets it names (``load.py``: ``from
retina_focal.config.load import load_config``; not imported here, so the model can read its
keys without importing the data readers)."""
from retina_focal.config.defaults import add_retina_focal_config, config_extension, warn_ignored_settings

__all__ = ["add_retina_focal_config", "config_extension", "warn_ignored_settings"]
