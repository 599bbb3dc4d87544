"""The private Ray and torch APIs the code relies on (sweep/ray_private.py,
iwae_model/torch_private.py) still exist and behave as checked: on another version this fails
here, not in a user's sweep."""

import importlib.util
import logging

from ray.tune.experiment import Trial

from iwae_model import torch_private
from sweep import ray_private


def test_ray_s_private_apis_are_as_checked():
    import ray

    assert ray.__version__ == ray_private.CHECKED_WITH, "check sweep/ray_private.py against this Ray"
    assert isinstance(ray_private.address_from_environment("127.0.0.1:6379"), str)
    assert ray_private.address_file().name  # a path, wherever Ray keeps it
    assert ray_private.kept_checkpoint_results(Trial("__fake", stub=True)) == []
    curves = ray_private.TrialCurves(dict)  # the base's per-trial state, which TrialCurves uses
    assert curves._trial_writer == {} and curves._trial_result == {} and callable(curves.log_trial_start)
    assert importlib.util.find_spec("ray.train._internal.storage") is not None
    ray_private.quiet_checkpoint_logging()
    assert logging.getLogger("ray.train._internal.storage").level == logging.WARNING
    from ray._private import ray_constants

    assert hasattr(ray_constants, "ENABLE_RAY_CLUSTER")


def test_torch_s_private_apis_are_as_checked():
    import torch._inductor.config  # noqa: I001 -- loads the compiler stack: only here

    assert torch.__version__.split("+")[0] == torch_private.CHECKED_WITH, "check iwae_model/torch_private.py"

    before = torch._inductor.config.deterministic
    try:
        torch_private.deterministic_inductor()
        assert torch._inductor.config.deterministic is True
    finally:
        torch._inductor.config.deterministic = before


def test_ray_s_wandb_callback_is_as_checked():
    """sweep.wandb_callback ends a stopped sweep's logging processes through these."""
    from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

    callback = WandbLoggerCallback(project="checked")
    assert callback._trial_logging_futures == {} and callback._trial_queues == {}
    assert callable(callback._signal_logging_actor_stop) and callback._logger_actor_cls is _WandbLoggingActor
    assert callable(_WandbLoggingActor.run)
