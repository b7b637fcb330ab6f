"""The classification entry's model EMA (``--model_ema_decay``): ``training.ema.ParameterEma``
with a constant decay, re-exported here under its old import path."""

from ..training.ema import ParameterEma

__all__ = ["ParameterEma"]
