"""LoRA and QLoRA fine-tuning of Llama-Mimi on one GPU:
``tune run llama_mimi_lora --config 1B_lora_single_device`` (``8B_qlora_single_device`` for 8B).

The training recipe of llama_mimi_full, unchanged: the LoRA model builders make the LoRA weights
and the audio rows of the embedding (and untied output projection) adapter parameters, so only
those train; checkpoints keep only them, and the Hugging Face checkpoint at the end of each epoch
holds the merged model and the adapter (with the audio rows).
"""

import sys

from llama_mimi_full import OPTIONAL_KEYS, recipe_main

from llama_mimi_tt.recipe_config import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe(recipe_main, "llama_mimi_lora", OPTIONAL_KEYS))
