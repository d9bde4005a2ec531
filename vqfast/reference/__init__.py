"""Pure-PyTorch references: the definition of correct for every vqfast op.

One module per op (``vqfast.reference.nearest_code``...), formulas in the docstrings.
"""
