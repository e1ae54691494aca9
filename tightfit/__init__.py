"""tightfit: compress a causal LM to fit a device, measured on that device, and run it there.

The package tree is the pipeline:
    formats/ -> model/, data/ -> algorithms/ -> stages/ -> pipeline/ -> cli/
    runtime/ and evaluate.py consume packed models and need only formats/.
"""

__version__ = "0.1.0"
