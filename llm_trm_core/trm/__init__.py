"""Stage 2 model internals: pair batches, baselines, TRM training and evaluation."""
