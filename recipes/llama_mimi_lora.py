"""LoRA and QLoRA fine-tuning of Llama-Mimi on one GPU:
``tune run llama_mimi_lora --config 1B_lora_single_device`` (``8B_qlora_single_device`` for 8B).

torchtune's LoRA recipe, unchanged in what it trains and saves: the model builders make the
audio rows of the embedding (and output projection) adapter parameters, so torchtune trains them
with the LoRA weights and saves them in the adapter checkpoint and the merged model.
``LlamaMimiTrainingMixin`` replaces the train loop as in ``llama_mimi_full``.
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from llama_mimi_tt._config import resolve_config_argv
from llama_mimi_tt.torchtune_recipes import load_torchtune_recipe
from llama_mimi_tt.training import LlamaMimiTrainingMixin, instantiate_recipe

_lora = load_torchtune_recipe("lora_finetune_single_device")


class LlamaMimiLoRASingleDevice(LlamaMimiTrainingMixin, _lora.LoRAFinetuneRecipeSingleDevice):
    pass


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    return instantiate_recipe(LlamaMimiLoRASingleDevice, cfg)


if __name__ == "__main__":
    sys.argv = resolve_config_argv(sys.argv)
    sys.exit(recipe_main())
