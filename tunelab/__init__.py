"""tunelab: prompt engineering vs fine-tuning, measured on your own data.

Importing this package is cheap: heavy libraries (torch, transformers) are imported lazily
by the modules that need them.
"""

import os

__version__ = "0.1.0"

# oneDNN (torch's CPU kernels) keeps up to 1,024 built primitives per process, each with its own
# buffers; a flow meets hundreds of shapes (every batch length) and reuses few. With 1,024 they held
# 0.3 GB after a short fine-tune and more over a flow; 64 trains and evaluates as fast (docs/results.md,
# "Memory"). Read when oneDNN builds its first primitive; a value the user set is kept.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
