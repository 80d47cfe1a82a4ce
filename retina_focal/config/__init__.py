"""Config: the ``MODEL.RETINA_FOCAL`` keys (``defaults.py``) and loading a config file with the
datasets it names (``load.py``: ``from retina_focal.config.load import load_config``; not
imported here, so the model can read its keys without importing the data readers)."""
from retina_focal.config.defaults import add_retina_focal_config, warn_ignored_settings

__all__ = ["add_retina_focal_config", "warn_ignored_settings"]
