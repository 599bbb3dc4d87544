"""Importance Weighted Autoencoders in pure PyTorch: Burda et al. (2016)'s models, data protocol
and k=5000 evaluation, Rainforth et al. (2018)'s MIWAE / CIWAE / PIWAE objectives, the VR bound and
reweighted wake-sleep, and any objective or dataset a plugin registers."""

# The AIS functions by their own names: a function called `ais` here would hide the submodule
# iwae_model.ais as an attribute of the package.
from .ais import ais_log_likelihood, bdmc
from .config import TrainConfig
from .data import Dataset, load_mnist
from .likelihood import active_units, bound, log_likelihood
from .models import IWAEModel, build_model
from .objectives import build_estimator, build_objective

__version__ = "0.1.0"
__all__ = [
    "Dataset",
    "IWAEModel",
    "TrainConfig",
    "active_units",
    "ais_log_likelihood",
    "bdmc",
    "bound",
    "build_estimator",
    "build_model",
    "build_objective",
    "load_mnist",
    "log_likelihood",
]
