"""Running predictions: one slide through the engines, one slide end to end, batches (local,
sharded, Ray), claims and disk space."""
