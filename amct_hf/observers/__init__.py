"""Observers: one class per (algorithm, mode), registered on import (see :mod:`.base`)."""
from .base import MODES, OBSERVERS, LayerBank, Observer, as_channels, check_activation, make_observer, register_observer
from .exact import BatchwiseHFMGObserver, ExactIFMRObserver, OneBatchHFMGObserver
from .streaming import StreamingHFMGObserver, StreamingIFMRObserver, default_grid_bins

__all__ = ["MODES", "OBSERVERS", "LayerBank", "Observer", "as_channels", "check_activation",
           "make_observer", "register_observer", "BatchwiseHFMGObserver", "ExactIFMRObserver",
           "OneBatchHFMGObserver", "StreamingHFMGObserver", "StreamingIFMRObserver",
           "default_grid_bins"]
