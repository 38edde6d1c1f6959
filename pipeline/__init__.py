"""pipeline: fault-tolerant distributed training with Ray Train, DeepSpeed ZeRO and WebDataset.

Importing the package is cheap: heavy frameworks are imported inside the module that owns them.
"""

__version__ = "0.1.0"
