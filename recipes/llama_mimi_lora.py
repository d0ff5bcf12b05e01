"""LoRA and QLoRA fine-tuning of Llama-Mimi on one GPU:
``tune run llama_mimi_lora --config 1B_lora_single_device`` (``8B_qlora_single_device`` for 8B).

torchtune's LoRA recipe, unchanged in what it trains: the model builders make the audio rows of
the embedding (and output projection) adapter parameters, so torchtune trains them with the LoRA
weights, and ``LlamaMimiCheckpointer`` saves them with the adapters and in the merged model.
``LlamaMimiTrainingMixin`` replaces the train loop as in ``llama_mimi_full``.
"""

import contextlib
import sys
from unittest import mock

from omegaconf import DictConfig
from torchtune import config

from llama_mimi_tt.modules import audio_rows_state_dict
from llama_mimi_tt.recipe_config import run_recipe
from llama_mimi_tt.torchtune_recipes import load_torchtune_recipe
from llama_mimi_tt.training import LlamaMimiTrainingMixin, instantiate_recipe

_lora = load_torchtune_recipe("lora_finetune_single_device")


class LlamaMimiLoRASingleDevice(LlamaMimiTrainingMixin, _lora.LoRAFinetuneRecipeSingleDevice):
    def save_checkpoint(self, epoch: int) -> None:
        model = self._model
        with contextlib.ExitStack() as stack:
            # the adapter dict keeps only "lora" keys: add the trained audio rows to it
            get_adapters = _lora.get_adapter_state_dict
            stack.enter_context(
                mock.patch.object(
                    _lora,
                    "get_adapter_state_dict",
                    lambda sd: {**get_adapters(sd), **audio_rows_state_dict(model)},
                )
            )
            if self._device.type == "cpu":
                # torchtune merges LoRA in place into `v.cpu()`, which on CPU is the live base
                # weight: hand it copies so training goes on from unmerged weights
                state_dict = model.state_dict
                stack.enter_context(
                    mock.patch.object(
                        model,
                        "state_dict",
                        lambda *a, **k: {n: t.clone() for n, t in state_dict(*a, **k).items()},
                    )
                )
            super().save_checkpoint(epoch)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    instantiate_recipe(LlamaMimiLoRASingleDevice, cfg)


if __name__ == "__main__":
    sys.exit(run_recipe(recipe_main, "llama_mimi_lora"))
