"""``python -m llama_mimi_tt.configs [NAME DEST]``: list the shipped configs, or copy one."""

import shutil
import sys

from llama_mimi_tt.recipe_config import available_configs, resolve_config

if __name__ == "__main__":
    if len(sys.argv) == 3:
        shutil.copy(resolve_config(sys.argv[1]), sys.argv[2])
        print(f"copied {sys.argv[1]} to {sys.argv[2]}")
    else:
        print("\n".join(available_configs()))
