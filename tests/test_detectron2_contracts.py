"""The lines of detectron2 and fvcore that retina_focal relies on beyond their public API, one
per place that relies on it. A detectron2 update that changes one fails here, naming the place
to revisit, instead of silently changing a checkpoint, a log period or an evaluation."""
import inspect

import pytest
from detectron2.engine import DefaultTrainer, hooks
from detectron2.engine.train_loop import AMPTrainer
from detectron2.evaluation import coco_evaluation
from fvcore.common.checkpoint import Checkpointer
from fvcore.common.registry import Registry

CONTRACTS = [
    # RetinaFocalCheckpointer.save passes the EMA weights as the "model" entry
    (Checkpointer.save, ['data["model"] = self.model.state_dict()', "data.update(kwargs)"], "checkpoint/checkpointer.py save"),
    # RetinaFocalCheckpointer._load_file hands the file name to _load_model in the checkpoint dict
    (Checkpointer.load, ["checkpoint = self._load_file(path)", "incompatible = self._load_model(checkpoint)"],
     "checkpoint/checkpointer.py _SOURCE_KEY"),
    # RetinaFocalTrainer._writer_hook rebuilds the writers hook with SOLVER.LOG_PERIOD
    (DefaultTrainer.build_hooks, ["hooks.PeriodicWriter(self.build_writers(), period=20)"], "engine/trainer.py _writer_hook"),
    (hooks.PeriodicWriter.__init__, ["self._writers = writers"], "engine/trainer.py _writer_hook"),
    # the faster-coco-eval evaluator swaps detectron2's COCOeval_opt while it evaluates
    (coco_evaluation.COCOEvaluator._eval_predictions, ["COCOeval_opt if self._use_fast_impl else COCOeval"],
     "evaluation/coco_evaluation.py _detectron2_fast_cocoeval"),
    (coco_evaluation.COCOEvaluator.__init__, ["COCOeval_opt is COCOeval"], "evaluation/coco_evaluation.py _detectron2_fast_cocoeval"),
    # get_registered names the registry in its error
    (Registry.__init__, ["self._name"], "utils/registry.py _registry_name"),
    # MixedPrecisionTrainer.load_state_dict gives AMPTrainer a scaler state when the checkpoint has none
    (AMPTrainer.load_state_dict, ['self.grad_scaler.load_state_dict(state_dict["grad_scaler"])'], "engine/amp.py load_state_dict"),
]


@pytest.mark.parametrize("function, lines, place", CONTRACTS, ids=[c[2] + " " + c[0].__qualname__ for c in CONTRACTS])
def test_detectron2_still_has_the_line(function, lines, place):
    source = inspect.getsource(function)
    missing = [line for line in lines if line not in source]
    assert not missing, f"{function.__qualname__} no longer has {missing}: revisit retina_focal/{place}"
