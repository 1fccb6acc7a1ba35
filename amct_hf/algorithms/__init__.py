"""Calibration algorithms (SPEC §3). Pure tensor code: nothing here knows about
transformers, record files or processes."""
from .convention import FLT_EPSILON, factors_from_clip
from .hfmg import HistogramState, hfmg_factors, histc_per_channel, merge_histograms
from .ifmr import ifmr_factors, ifmr_initial_bounds

__all__ = [
    "FLT_EPSILON", "factors_from_clip", "ifmr_factors", "ifmr_initial_bounds",
    "HistogramState", "hfmg_factors", "histc_per_channel", "merge_histograms",
]
