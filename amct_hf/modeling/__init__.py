"""Everything that knows transformers: attention routing, model <-> record layout,
model loading, the INT8 KV cache. Nothing below ``amct_hf.modeling`` imports it."""

from .compat import check_transformers_version

check_transformers_version()  # before any submodule reaches into transformers' internals
