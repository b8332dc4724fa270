"""kdlib: knowledge distillation of Whisper speech recognition.

The library behind the kdlib book. Data flows one way:
config -> data -> models -> losses -> train -> evaluate / viz; a lower layer never imports a
higher one. Importing the package is cheap: submodules import torch and transformers themselves.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

__version__ = "0.1.0"

# peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` alias inside every
# PeftModel(...) (get_peft_model, PeftModel.from_pretrained), and transformers 5 warns about
# that line on each LoRA model we build. Not ours to fix and nothing a reader can act on, so
# only this one message is silenced.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                        category=FutureWarning, module="transformers.modeling_utils")


def cache_dir() -> Path:
    """Folder for converted models and other derived files: ``$KDLIB_CACHE`` or ``~/.cache/kdlib``."""
    root = os.environ.get("KDLIB_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "kdlib"
    path.mkdir(parents=True, exist_ok=True)
    return path
