"""The peer of llama_mimi_full's loading under FSDP2, for bench/rehearsal.py: the recipe as it
loaded the base checkpoint before, every rank reading the whole checkpoint and torchtune's
``training.load_from_full_model_state_dict`` sharding it (torchtune 0.6.1: each rank casts and
distributes its own full copy).

    torchrun --nproc_per_node 2 bench/every_rank_loads.py --config 1B_full ...
"""

import sys

import llama_mimi_full
from torchtune import config, training

from llama_mimi_tt.recipe_config import run_recipe


class EveryRankLoads(llama_mimi_full.LlamaMimiFinetuneRecipe):
    def _load_sharded(self, model, cpu_offload: bool) -> None:
        state_dict = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
        training.load_from_full_model_state_dict(
            model, state_dict, self._device, strict=True, cpu_offload=cpu_offload
        )


@config.parse
def recipe_main(cfg) -> None:
    llama_mimi_full.train(cfg, EveryRankLoads)


if __name__ == "__main__":
    sys.exit(run_recipe(recipe_main, "llama_mimi_full", llama_mimi_full.OPTIONAL_KEYS))
