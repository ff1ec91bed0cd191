"""Training: the sparse fusion loss, block packing, and the Ray Train loop."""
