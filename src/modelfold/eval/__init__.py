"""Evaluation helpers: latency, perplexity, zero-shot tasks, resources (the CNN sweep lives in
the source checkout's `experiments/sweep.py`)."""
