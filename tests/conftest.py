import os
import sys
from pathlib import Path

# Tests import helpers as ``tests.<module>``; run from any directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
