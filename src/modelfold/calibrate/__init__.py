"""Self-calibrated folding: the model synthesises its own calibration inputs, channels are
merged by what they compute on them, per-group sensitivity decides the allocation and the
consumers are refitted by least squares. No external data anywhere.

* `synthetic`: calibration inputs from the model itself (BN statistics inversion for BN
  networks, token sequences for embedding models).
* `activation`: the merge and refit arithmetic shared with the LLM path.
* `graph`: the pipeline for models folded through the traced graph (`modelfold.fold(...,
  self_calibrate=True)`).
"""
