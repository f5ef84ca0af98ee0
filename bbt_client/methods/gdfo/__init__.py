"""GDFO: CMA-ES on the black box harmonised with gradient descent through a local student."""
