"""What factors cost: perplexity with K/V quantized by a record, paired bootstrap
intervals, and the per-layer report of a record's ranges."""
