"""Preference alignment of Llama-Mimi with DPO (Rafailov et al., 2023), as SlamKit does for
speech LMs: ``tune run llama_mimi_dpo --config tiny_dpo`` (``1B_lora_dpo_single_device``).

The training recipe of llama_mimi_full (setup, step checkpoints, resume, config checks,
validation on held-out audio) with another step: the chosen and rejected continuations of each
pair (``tune run llama_mimi_pairs``, or your own pairs file) go through the policy in one batch,
and through the reference policy, which is the same model with its LoRA adapters disabled (no
second copy). torchtune's ``DPOLoss`` on the summed log-probabilities of the continuation tokens
only (never the prompt). Logged: ``loss``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``log_probs/chosen``, ``log_probs/rejected``, and
the semantic / acoustic losses of the chosen continuations.

The audio rows must not train here (``model.train_audio_rows: False``): disabling the adapters
would not undo them, and the reference policy would drift.
"""

import sys

import torch
from llama_mimi_full import OPTIONAL_KEYS, LlamaMimiFinetuneRecipe, StepResult, train
from omegaconf import DictConfig
from torchtune import config
from torchtune.modules.peft import disable_adapter
from torchtune.rlhf import get_batch_log_probs

from llama_mimi_tt.errors import UserError
from llama_mimi_tt.loss import LlamaMimiLoss
from llama_mimi_tt.modules import audio_rows_state_dict
from llama_mimi_tt.recipe_config import run_recipe
from llama_mimi_tt.training import IGNORE_INDEX


class LlamaMimiDPORecipe(LlamaMimiFinetuneRecipe):
    """DPO with LoRA on one device; the reference policy is the model with adapters disabled."""

    def _setup_loss(self, cfg: DictConfig) -> None:
        if not self._lora:
            raise UserError(
                "llama_mimi_dpo needs a LoRA model (the reference policy is the model with its "
                "adapters disabled): use a lora_llama_mimi_* builder"
            )
        if audio_rows_state_dict(self._model):
            raise UserError(
                "set model.train_audio_rows=False for DPO: trained audio rows are not disabled "
                "with the adapters, so the reference policy would move with the policy"
            )
        self._dpo_loss = config.instantiate(cfg.loss)
        v = self._tokenizer.vocab
        # the level losses of the chosen continuations and the held-out validation loss
        self._loss_fn = LlamaMimiLoss(
            num_quantizers=v.num_quantizers, text_vocab_size=v.text_vocab_size
        )
        self._model.set_num_output_chunks(0)  # whole logits: log-probabilities per sequence

    def train_step(self, batch) -> StepResult:
        input_ids, labels = (t.to(self._device) for t in batch)
        half = input_ids.shape[0] // 2  # padded_collate_dpo: chosen rows, then rejected rows
        with self._activations_ctx:
            logits = self._model(input_ids)
        logps = get_batch_log_probs(logits, labels, label_pad_token_id=IGNORE_INDEX)
        with torch.no_grad(), disable_adapter(self._model):
            ref_logps = get_batch_log_probs(
                self._model(input_ids), labels, label_pad_token_id=IGNORE_INDEX
            )
        losses, chosen_rewards, rejected_rewards = self._dpo_loss(
            logps[:half], logps[half:], ref_logps[:half], ref_logps[half:]
        )
        chosen = logits[:half, :-1].detach()
        level = self._loss_fn.compute_cross_entropy(
            chosen.reshape(-1, chosen.shape[-1]), labels[:half, 1:].reshape(-1)
        )[1:]
        metrics = {
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "log_probs/chosen": logps[:half].detach().sum(),
            "log_probs/rejected": logps[half:].detach().sum(),
        }
        count = torch.tensor(half, device=self._device)
        return StepResult(losses.sum(), count, (labels != IGNORE_INDEX).sum(), level, metrics)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    train(cfg, LlamaMimiDPORecipe)


if __name__ == "__main__":
    sys.exit(run_recipe(recipe_main, "llama_mimi_dpo", OPTIONAL_KEYS))
