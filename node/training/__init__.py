"""Local LoRA training: torch base from the served GGUF, peft adapters, DP-SGD, GGUF adapter export.

Heavy (torch, transformers, peft): imported only by training code paths and the training subprocess.
"""

import os

# Mirador never fetches models or data from a hub at run time: everything comes from local GGUF files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
