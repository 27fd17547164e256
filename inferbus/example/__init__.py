"""The digits example that ``inferbus demo`` runs, inside the package so that a plain
``pip install`` runs it from any folder: the model repository (``MODELS``: an MLP trained on
scikit-learn's 8x8 handwritten digits, 28 KiB), its held-out images (``DATA``) and the
application end (``APP``). In a clone, ``examples/`` links to these files."""

from __future__ import annotations

from pathlib import Path
from typing import Final

HERE: Final = Path(__file__).parent
APP: Final = HERE / "digits_app.py"
MODELS: Final = HERE / "models"
DATA: Final = HERE / "data" / "digits_heldout.npz"
