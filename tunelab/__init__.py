"""tunelab: prompt engineering vs fine-tuning, measured on your own data.

Importing this package is cheap: heavy libraries (torch, transformers) are imported lazily
by the modules that need them.
"""

__version__ = "0.1.0"
