"""tforge: compile, quantize and verify trained Transformers.

The package is named ``pipeline``; the distribution and the command are ``tforge``.
"""

__version__ = "0.1.0"
