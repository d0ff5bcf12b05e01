"""Full fine-tuning of Llama-Mimi: ``tune run llama_mimi_full --config 1B_full``.

One device, or FSDP2 over many with ``tune run --nproc_per_node N llama_mimi_full ...`` (several
nodes through the usual torchrun flags). Starts from a base Llama 3.x checkpoint (how Llama-Mimi
itself is trained: the checkpointer adds the audio rows) or from a Llama-Mimi checkpoint.

This is torchtune's own full fine-tuning recipe; ``LlamaMimiTrainingMixin`` replaces its train
loop to log the semantic and acoustic losses apart and a validation loss every N steps.
"""

import sys
from unittest import mock

from omegaconf import DictConfig
from torchtune import config, training

from llama_mimi_tt.recipe_config import run_recipe
from llama_mimi_tt.torchtune_recipes import load_torchtune_recipe
from llama_mimi_tt.training import LlamaMimiTrainingMixin, instantiate_recipe

_single = load_torchtune_recipe("full_finetune_single_device")
_distributed = load_torchtune_recipe("full_finetune_distributed")


class LlamaMimiFullSingleDevice(LlamaMimiTrainingMixin, _single.FullFinetuneRecipeSingleDevice):
    pass


class LlamaMimiFullDistributed(LlamaMimiTrainingMixin, _distributed.FullFinetuneRecipeDistributed):
    def _setup_model(self, *args, **kwargs):
        # torchtune logs CUDA memory stats here unconditionally; a CPU (gloo) run has none
        if self._device.type != "cpu":
            return super()._setup_model(*args, **kwargs)
        with (
            mock.patch.object(training, "get_memory_stats", lambda device: {}),
            mock.patch.object(training, "log_memory_stats", lambda stats: None),
        ):
            return super()._setup_model(*args, **kwargs)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    distributed = training.is_distributed()
    instantiate_recipe(LlamaMimiFullDistributed if distributed else LlamaMimiFullSingleDevice, cfg)


if __name__ == "__main__":
    sys.exit(run_recipe(recipe_main, "llama_mimi_full"))
