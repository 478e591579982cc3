"""The math of LORS, as pure tensor functions (no modules, no files):

- :mod:`.lorst`: shared mean + truncated SVD of the residuals (LORST), parameter counts;
- :mod:`.whiten`: the same under calibration Grams (whitened SVD, weighted shared part);
- :mod:`.tucker`: truncated HOSVD / HOOI of generator tensors (LORSA);
- :mod:`.budget`: greedy rank allocation under a parameter budget.
"""
