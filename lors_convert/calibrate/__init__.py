"""Calibration: run the source model on sample inputs to weight the fit (input and output-gradient
Grams) and to measure what a conversion did to the model's function.

``batches`` (running a model on a batch) < ``data`` (reading inputs from files), ``sensitivity``
(output-gradient Grams) < ``grams`` (input Grams, :func:`collect_grams`), ``fidelity`` (held-out
metrics).
"""
