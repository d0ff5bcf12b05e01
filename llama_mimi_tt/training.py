"""What llama_mimi_full and llama_mimi_lora add to torchtune's fine-tuning recipes.

torchtune's recipe classes do the setup (model, checkpointer, optimizer, FSDP2, data) and we keep
all of it. We replace ``train()`` because Llama-Mimi needs, inside the loop: the semantic (q = 0)
and acoustic (q >= 1) losses logged apart, a validation loss every N steps, peak memory on CPU
as well as CUDA, and checks of the audio vocabulary before the first step. The same loop serves
the one-device recipes and the FSDP2 one (all-reduce only when a process group is up).
"""

import resource
import time
from functools import partial
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torchdata.stateful_dataloader import StatefulDataLoader
from torchtune import config, training, utils
from torchtune.config._utils import _get_component_from_path
from torchtune.data import padded_collate_packed
from torchtune.training.lr_schedulers import get_lr
from tqdm import tqdm

from llama_mimi_tt.loss import LlamaMimiLoss
from llama_mimi_tt.tokenizer import LlamaMimiTokenizer

log = utils.get_logger("INFO")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def check_audio_setup(model, tokenizer, loss_fn) -> None:
    """Fails before any training step when the pieces disagree on the audio vocabulary."""
    if not isinstance(tokenizer, LlamaMimiTokenizer):
        raise ValueError(
            f"tokenizer is {type(tokenizer).__name__}; Llama-Mimi recipes need "
            "llama_mimi_tt.llama_mimi_tokenizer (it adds the audio ids)"
        )
    vocab = tokenizer.vocab
    if isinstance(loss_fn, LlamaMimiLoss) and loss_fn.vocab != vocab:
        raise ValueError(
            f"loss is set up for num_quantizers={loss_fn.vocab.num_quantizers}, "
            f"text_vocab_size={loss_fn.vocab.text_vocab_size} but the tokenizer for "
            f"num_quantizers={vocab.num_quantizers}, text_vocab_size={vocab.text_vocab_size}: "
            "set both from the same `num_quantizers` in the config"
        )
    rows = model.tok_embeddings.num_embeddings  # nn.Embedding or the LoRA ExtendedEmbedding
    if rows < vocab.size:
        raise ValueError(
            f"the model embeds {rows} ids but num_quantizers={vocab.num_quantizers} needs "
            f"{vocab.size} (T={vocab.text_vocab_size} + 2048 * Q + 2): build the model with the "
            "same num_quantizers and text_vocab_size as the tokenizer"
        )


def check_max_seq_len(cfg_tokenizer: DictConfig) -> None:
    """A sequence holds at least <|begin_of_text|>, <audio> and one frame of Q codes."""
    max_seq_len = cfg_tokenizer.get("max_seq_len", None)
    q = cfg_tokenizer.get("num_quantizers", 4)
    if max_seq_len is not None and max_seq_len < 2 + q:
        raise ValueError(
            f"max_seq_len={max_seq_len} is too short for one frame: a sequence needs at least "
            f"{2 + q} tokens (<|begin_of_text|>, <audio> and Q={q} codes)"
        )


def peak_memory_stats(device: torch.device) -> Dict[str, float]:
    """torchtune's CUDA stats, or this process's peak resident memory on CPU."""
    if device.type == "cpu":
        return {"peak_memory_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    return training.get_memory_stats(device=device)


class StreamingDataLoader(StatefulDataLoader):
    """A loader over a streaming (iterable) dataset, whose epoch is ``steps`` batches: torchtune's
    recipes size an epoch with ``len(dataloader)``, which a stream does not have."""

    def __init__(self, dataset, steps: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps


class LlamaMimiTrainingMixin:
    """Mixed into a torchtune fine-tuning recipe class (put it first in the bases)."""

    def setup(self, cfg: DictConfig) -> None:
        if cfg.get("optimizer_in_bwd", False):
            raise ValueError(
                "optimizer_in_bwd is not supported by the Llama-Mimi recipes: set "
                "optimizer_in_bwd=False (use gradient_accumulation_steps or a paged optimizer)"
            )
        check_max_seq_len(cfg.tokenizer)  # before anything heavy is loaded
        super().setup(cfg)
        check_audio_setup(self._model, self._tokenizer, self._loss_fn)
        self._rank_zero = not _distributed() or dist.get_rank() == 0
        self._world_size = dist.get_world_size() if _distributed() else 1
        val = cfg.get("validation", None)
        self._val_every_n_steps = val.get("every_n_steps", 0) if val else 0
        self._val_max_batches = val.get("max_batches", None) if val else None
        self._val_dataloader = None
        if val and self._val_every_n_steps:
            self._val_dataloader = self._setup_data(
                cfg_dataset=val.dataset,
                shuffle=False,
                batch_size=val.get("batch_size", cfg.batch_size),
                collate_fn=cfg.get("collate_fn", "torchtune.data.padded_collate_sft"),
            )
            if len(self._val_dataloader) == 0:
                raise ValueError(
                    "validation is on (validation.every_n_steps > 0) but its split gives no "
                    f"batch of {val.get('batch_size', cfg.batch_size)}: raise "
                    "validation.dataset.val_fraction (and dataset.val_fraction with it), lower "
                    "validation.batch_size, or set validation.every_n_steps=0"
                )
        self.loss_history = []  # (step, loss) of this run, for tests and the demo's plot

    def _setup_data(
        self,
        cfg_dataset: DictConfig,
        shuffle: bool,
        batch_size: int,
        collate_fn: str,
        dataloader_state_dict: Optional[Dict[str, Any]] = None,
    ) -> StatefulDataLoader:
        """torchtune's data setup, plus streaming datasets (``dataset.streaming: True``), which
        torchtune's samplers cannot index: they shard themselves by rank and shuffle in a buffer."""
        if not cfg_dataset.get("streaming", False):
            return super()._setup_data(
                cfg_dataset, shuffle, batch_size, collate_fn, dataloader_state_dict
            )
        if self.max_steps_per_epoch is None:
            raise ValueError(
                "dataset.streaming=True has no length: set max_steps_per_epoch (the batches that "
                "make one epoch on each rank)"
            )
        ds = config.instantiate(cfg_dataset, self._tokenizer)
        if cfg_dataset.get("packed", False):
            collate = padded_collate_packed
        else:
            collate = partial(
                _get_component_from_path(collate_fn),
                padding_idx=self._tokenizer.pad_id,
                ignore_idx=self._loss_fn.ignore_index,
            )
        loader = StreamingDataLoader(
            ds,
            steps=self.max_steps_per_epoch * self._gradient_accumulation_steps,
            batch_size=batch_size,
            collate_fn=collate,
            drop_last=True,
        )
        if dataloader_state_dict is not None:
            loader.load_state_dict(dataloader_state_dict)
        return loader

    def _set_epoch(self, epoch: int) -> None:
        sampler = self._dataloader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        elif hasattr(self._dataloader.dataset, "set_epoch"):  # streaming: reshuffles its buffer
            self._dataloader.dataset.set_epoch(epoch)

    # ---- one forward: loss (token mean) and the level sums --------------------------------
    def _forward_loss(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch.pop("labels")
        with self.activations_handling_ctx:
            logits = self._model(**batch)
        # predict token t+1 at position t: shift labels, pad with ignore_index
        labels = torch.hstack((labels[..., 1:], self.ignore_labels_cache[: labels.shape[0]]))
        if not isinstance(logits, list):
            labels = labels.reshape(-1)
            logits = logits.reshape(-1, logits.size(-1))
        loss = self._loss_fn(logits, labels)
        del logits
        return loss

    def _level_stats(self) -> torch.Tensor:
        stats = getattr(self._loss_fn, "level_stats", None)
        return stats.to(self._device) if stats is not None else torch.zeros(4, device=self._device)

    def _all_reduce(self, *tensors):
        if _distributed():
            for t in tensors:
                dist.all_reduce(t)

    @staticmethod
    def _level_losses(stats: torch.Tensor, prefix: str = "") -> Dict[str, float]:
        s = stats.tolist()
        out = {}
        if s[1]:
            out[prefix + "semantic_loss"] = s[0] / s[1]
        if s[3]:
            out[prefix + "acoustic_loss"] = s[2] / s[3]
        return out

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """Token-mean loss (and level losses) on the held-out split."""
        self._model.eval()
        total = torch.zeros((), device=self._device)
        tokens = torch.zeros((), device=self._device, dtype=torch.long)
        stats = torch.zeros(4, device=self._device)
        for i, batch in enumerate(self._val_dataloader):
            if self._val_max_batches is not None and i >= self._val_max_batches:
                break
            utils.batch_to_device(batch, self._device)
            n = (batch["labels"] != self._loss_fn.ignore_index).sum()
            total += self._forward_loss(batch) * n
            tokens += n
            stats += self._level_stats()
        self._all_reduce(total, tokens, stats)
        self._model.train()
        out = {"val_loss": (total / tokens.clamp(min=1)).item()}
        out.update(self._level_losses(stats, "val_"))
        return out

    def _save_epoch(self, epoch: int) -> None:
        if hasattr(self, "_checkpoint_client"):  # torchtune's FSDP2 recipe
            from torchtune.training.checkpointing._checkpoint_client import TrainingProgress

            self._checkpoint_client.save_checkpoint(
                model=self._model,
                optimizer=self._optimizer,
                training_progress=TrainingProgress(
                    seed=self.seed,
                    epochs_run=self.epochs_run,
                    total_epochs=self.total_epochs,
                    max_steps_per_epoch=self.max_steps_per_epoch,
                    dataloader_state_dict=self._dataloader.state_dict(),
                ),
                epoch=epoch,
            )
        else:
            self.save_checkpoint(epoch=epoch)

    # ---- the loop ------------------------------------------------------------------------
    def train(self) -> None:
        if self._compile:
            log.info("torch.compile is on: the first step compiles and is slow")
        self._optimizer.zero_grad()
        ignore = self._loss_fn.ignore_index
        t0 = time.perf_counter()
        running_loss = torch.zeros((), device=self._device)
        num_tokens = torch.zeros((), device=self._device, dtype=torch.long)
        stats = torch.zeros(4, device=self._device)
        self._profiler.start()
        for curr_epoch in range(self.epochs_run, self.total_epochs):
            self._set_epoch(curr_epoch)
            pbar = tqdm(total=self._steps_per_epoch, disable=not self._rank_zero)
            for idx, batch in enumerate(self._dataloader):
                if idx // self._gradient_accumulation_steps == self._steps_per_epoch:
                    break
                utils.batch_to_device(batch, self._device)
                n = (batch["labels"] != ignore).sum()
                loss = self._forward_loss(batch) * n
                running_loss += loss.detach()
                num_tokens += n
                stats += self._level_stats()
                loss.backward()
                if (idx + 1) % self._gradient_accumulation_steps:
                    continue

                # one optimizer step over the accumulated batches (and ranks)
                self._all_reduce(num_tokens, running_loss, stats)
                # FSDP2 averages gradients over ranks: scale by world size / global tokens
                training.scale_grads(self._model, self._world_size / num_tokens)
                grad_norm = None
                if self._clip_grad_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        self._model.parameters(), max_norm=float(self._clip_grad_norm)
                    )
                    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
                        grad_norm = grad_norm.full_tensor()
                self._optimizer.step()
                self._optimizer.zero_grad(set_to_none=True)
                if self._lr_scheduler is not None:
                    self._lr_scheduler.step()
                self.global_step += 1

                step_loss = running_loss.item() / max(num_tokens.item(), 1)
                self.loss_history.append((self.global_step, step_loss))
                pbar.update(1)
                pbar.set_description(f"{curr_epoch + 1}|{self.global_step}|Loss: {step_loss:.4f}")
                if self.global_step % self._log_every_n_steps == 0 and self._rank_zero:
                    seconds = time.perf_counter() - t0
                    log_dict = {
                        "loss": step_loss,
                        "lr": get_lr(self._optimizer),
                        "tokens_per_second_per_gpu": num_tokens.item()
                        / (seconds * self._world_size),
                        **self._level_losses(stats),
                        **peak_memory_stats(self._device),
                    }
                    if grad_norm is not None:
                        log_dict["grad_norm"] = float(grad_norm)
                    self._metric_logger.log_dict(log_dict, step=self.global_step)
                if self._val_dataloader is not None and (
                    self.global_step % self._val_every_n_steps == 0
                ):
                    val = self.validate()
                    if self._rank_zero:
                        log.info(
                            f"step {self.global_step}: "
                            + ", ".join(f"{k} {v:.4f}" for k, v in val.items())
                        )
                        self._metric_logger.log_dict(val, step=self.global_step)
                running_loss.zero_()
                num_tokens.zero_()
                stats.zero_()
                self._profiler.step()
                t0 = time.perf_counter()
            pbar.close()
            self.epochs_run += 1
            self._save_epoch(curr_epoch)
        self._profiler.stop()


def instantiate_recipe(recipe_cls, cfg: DictConfig):
    """Shared ``recipe_main`` body: log the config, set up, train, clean up."""
    config.log_config(recipe_name=recipe_cls.__name__, cfg=cfg)
    recipe = recipe_cls(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()
    return recipe
