"""Training and evaluation runs: the trainer (``trainer.py``), ``setup``/``evaluate`` and the
command line (``defaults.py``), mixed precision (``amp.py``), EMA, hooks, the non-finite-loss
report and the LazyConfig loop.

``retina_focal.engine.load_config`` is kept for one release: it moved to
``retina_focal.config.load.load_config`` (deprecated here).
"""
from retina_focal.config.load import (
    load_config,  # deprecated path; use retina_focal.config.load
)
from retina_focal.engine.defaults import argument_parser, evaluate, setup
from retina_focal.engine.non_finite import NonFiniteLossError
from retina_focal.engine.trainer import (
    RetinaFocalTrainer,
    build_checkpointer,
    create_ddp_model,
    run_facts,
)

__all__ = [
    "NonFiniteLossError",
    "RetinaFocalTrainer",
    "argument_parser",
    "build_checkpointer",
    "create_ddp_model",
    "evaluate",
    "load_config",
    "run_facts",
    "setup",
]
