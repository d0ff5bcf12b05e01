"""Training Llama-Mimi: ``tune run llama_mimi_full --config 1B_full`` (full fine-tune) and
``tune run llama_mimi_lora --config 1B_lora_single_device`` (LoRA / QLoRA: the same recipe).

One device, or FSDP2 over N processes with ``tune run --nproc_per_node N llama_mimi_full ...``.
Starts from a base Llama 3.x checkpoint (as Llama-Mimi itself was trained: the checkpointer adds
the audio rows) or from a Llama-Mimi checkpoint. The loop logs the semantic (level 0) and
acoustic (levels 1..Q-1) losses of the same forward, a validation loss every N steps, tokens/s
and peak memory.

Checkpoints are ``output_dir/step_N`` folders (llama_mimi_tt/train_state.py), every
``save_every_n_steps`` and at the end of each epoch, written whole or not at all; those at the
end of an epoch (or every ``save_hf_every_n_steps``) also hold the Hugging Face model that
generate, eval and transformers load. ``resume_from_checkpoint=True`` continues from the newest
complete one at the exact next batch.
"""

import gc
import time
from functools import partial
from typing import Any, Dict, NamedTuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torchtune import config, modules, training, utils
from torchtune.modules.peft import (
    get_adapter_params,
    get_adapter_state_dict,
    get_lora_module_names,
    get_merged_lora_ckpt,
    set_trainable_params,
)
from torchtune.training.lr_schedulers import get_lr
from tqdm import tqdm

from llama_mimi_tt import train_state
from llama_mimi_tt.errors import UserError
from llama_mimi_tt.modules import audio_rows_state_dict
from llama_mimi_tt.recipe_config import run_recipe
from llama_mimi_tt.training import (
    all_reduce,
    build_dataloader,
    check_audio_setup,
    check_max_seq_len,
    forward_loss,
    host_memory_gib,
    level_losses,
    peak_memory_stats,
    set_epoch,
    validate,
)

log = utils.get_logger("INFO")

# keys the recipe reads that no shipped config sets
OPTIONAL_KEYS = (
    "profiler",
    "collate_fn",
    "custom_sharded_layers",
    "fsdp_cpu_offload",
    "save_hf_every_n_steps",
    "num_workers",
)


class StepResult(NamedTuple):
    """What one batch gives the loop: the summed loss to back-propagate, what it is a sum over
    (tokens here; pairs for DPO), the target tokens, the level-loss sums and other metric sums."""

    loss_sum: torch.Tensor
    count: torch.Tensor
    tokens: torch.Tensor
    level_stats: torch.Tensor
    metrics: Dict[str, torch.Tensor]


def must_match(cfg: DictConfig, world_size: int) -> Dict[str, Any]:
    """What a checkpoint and the config resuming it must agree on: the model (shape, Q, LoRA),
    and what decides which batches each step sees."""
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "num_quantizers": cfg.tokenizer.get("num_quantizers"),
        "max_seq_len": cfg.tokenizer.get("max_seq_len"),
        "batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.get("gradient_accumulation_steps", 1),
        "world_size": world_size,
        "seed": cfg.seed,
    }


class LlamaMimiFinetuneRecipe:
    """Full, LoRA and QLoRA fine-tuning of Llama-Mimi, on one device or FSDP2 (see the module
    docstring). LoRA is on when the model builder makes adapter parameters."""

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        if self._dtype == torch.float16:
            raise UserError("dtype=fp16 is not supported: use bf16 (or fp32)")
        if cfg.get("optimizer_in_bwd", False):
            raise UserError(
                "optimizer_in_bwd is not supported by the Llama-Mimi recipes: set "
                "optimizer_in_bwd=False (use gradient_accumulation_steps or a paged optimizer)"
            )
        if training.is_distributed() and not dist.is_initialized():
            backend = "gloo" if self._device.type == "cpu" else "cuda:nccl,cpu:gloo"
            dist.init_process_group(backend=backend)
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self.is_rank_zero = self.rank == 0
        self.output_dir = cfg.output_dir
        self.seed = training.set_seed(seed=cfg.seed)
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        self.grad_accum = cfg.get("gradient_accumulation_steps", 1)
        self.clip_grad_norm = cfg.get("clip_grad_norm", None)
        self.log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self.log_peak_memory_stats = cfg.get("log_peak_memory_stats", False)
        self.save_every_n_steps = cfg.get("save_every_n_steps", None)
        self.save_hf_every_n_steps = cfg.get("save_hf_every_n_steps", None)
        self.keep_last_n_checkpoints = cfg.get("keep_last_n_checkpoints", None)
        for key in ("epochs", "batch_size", "gradient_accumulation_steps", "log_every_n_steps"):
            if not isinstance(cfg.get(key, 1), int) or cfg.get(key, 1) < 1:
                raise UserError(f"{key} must be a positive integer, got {cfg.get(key)!r}")
        for key in ("max_steps_per_epoch", "save_every_n_steps", "keep_last_n_checkpoints"):
            value = cfg.get(key, None)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"{key} must be null or a positive integer, got {value!r}")
        self.global_step = 0
        self.epochs_run = 0
        self.finished = False
        self.loss_history = []  # (step, loss) of this process's run: for tests and the demo

    # ---- setup --------------------------------------------------------------------------------
    def setup(self, cfg: DictConfig) -> None:
        check_max_seq_len(cfg.tokenizer)  # before anything heavy is loaded
        self._metric_logger = config.instantiate(cfg.metric_logger) if self.is_rank_zero else None
        if self.is_rank_zero:
            self._metric_logger.log_config(cfg)
        resume_from = self._find_resume_point(cfg) if cfg.resume_from_checkpoint else None
        if self.finished:
            return
        self._cfg_model = cfg.model
        self._must_match = must_match(cfg, self.world_size)
        self._checkpointer = config.instantiate(cfg.checkpointer)
        self._compile = cfg.get("compile", False)
        self._model = self._setup_model(cfg)
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._setup_loss(cfg)
        check_audio_setup(self._model, self._tokenizer, self._loss_fn)
        self._optimizer = config.instantiate(cfg.optimizer, self._model.parameters())

        loader_state = None
        if resume_from is not None:
            for group in self._optimizer.param_groups:  # recorded by the LR scheduler, saved
                group.setdefault("initial_lr", group["lr"])  # with the optimizer state
            loader_state = train_state.load(resume_from, self._model, self._optimizer)["loader"]
        self._dataloader = self._build_loader(cfg, loader_state)
        self._lr_scheduler = None
        if cfg.get("lr_scheduler", None) is not None:
            self._lr_scheduler = config.instantiate(
                cfg.lr_scheduler,
                self._optimizer,
                num_training_steps=self.total_epochs * self.steps_per_epoch,
                last_epoch=self.global_step - 1,
            )
        self._val_dataloader = self._setup_validation(cfg)
        self._profiler = self._setup_profiler(cfg.get("profiler", None))
        self._log_host_memory("after setup")

    def _setup_loss(self, cfg: DictConfig) -> None:
        self._loss_fn = config.instantiate(cfg.loss)
        if self._compile:
            training.compile_loss(self._loss_fn, verbose=self.is_rank_zero)
        # chunked output: the full-vocabulary logits never exist in fp32 at once
        self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)

    def _find_resume_point(self, cfg: DictConfig):
        """The newest complete ``step_N``; sets the counters, or ``finished``."""
        train_state.remove_stale_temporaries(cfg.output_dir)
        found = train_state.complete_checkpoints(cfg.output_dir)
        if not found:
            raise UserError(
                f"resume_from_checkpoint=True but {cfg.output_dir} has no complete step_N "
                "checkpoint: resume with the output_dir of the interrupted run, or drop "
                "resume_from_checkpoint to start anew"
            )
        step, path = found[-1]
        state = train_state.read_state(path)
        expected = must_match(cfg, self.world_size)
        for key, value in expected.items():
            if state["must_match"].get(key) != value:
                raise UserError(
                    f"cannot resume from {path}: it was trained with {key}="
                    f"{state['must_match'].get(key)!r} and the config says {value!r}. Use the "
                    "config of that run, or another output_dir to start anew"
                )
        self.global_step, self.epochs_run = state["step"], state["epochs_run"]
        if self.global_step >= state["total_steps"] and self.epochs_run >= self.total_epochs:
            self.finished = True
            log.info(
                f"{path}: this run already finished ({self.epochs_run} epochs, step "
                f"{self.global_step}); nothing to train. Raise epochs to train further."
            )
            return None
        log.info(f"resuming from {path}: step {self.global_step}, epoch {self.epochs_run + 1}")
        return path

    def _setup_model(self, cfg: DictConfig) -> torch.nn.Module:
        distributed = self.world_size > 1
        init_device = torch.device("meta") if distributed else self._device
        with training.set_default_dtype(self._dtype), init_device:
            model = config.instantiate(cfg.model)
        self._lora = bool(get_adapter_params(model))
        if self._lora:
            set_trainable_params(model, get_adapter_params(model))
            if distributed:
                raise UserError(
                    "LoRA runs on one device here: run llama_mimi_lora without --nproc_per_node "
                    "(or llama_mimi_full with a full model for FSDP2)"
                )
        if cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(
                model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
            )
        if self._compile:
            training.compile_model(model, verbose=self.is_rank_zero)
        self._checkpointer.check_model(model)
        if distributed:
            training.shard_model(
                model=model,
                shard_conditions=[
                    partial(
                        training.get_shard_conditions,
                        names_to_match=cfg.get("custom_sharded_layers", None),
                    )
                ],
                cpu_offload=cfg.get("fsdp_cpu_offload", False),
                reshard_after_forward=True,
            )
            with training.set_default_dtype(self._dtype), self._device:
                for m in model.modules():
                    if hasattr(m, "rope_init"):
                        m.rope_init()
            self._load_sharded(model, cfg.get("fsdp_cpu_offload", False))
            training.validate_no_params_on_meta_device(model)
        else:
            state_dict = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
            missing, unexpected = model.load_state_dict(state_dict, strict=False)
            missing = [k for k in missing if not (self._lora and "lora_" in k)]
            if missing or unexpected:
                raise UserError(
                    f"the checkpoint in {self._checkpointer.checkpoint_dir} does not fit the "
                    f"model: missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
            del state_dict
        self._activations_ctx = training.get_act_offloading_ctx_manager(
            model, cfg.get("enable_activation_offloading", False)
        )
        if self.log_peak_memory_stats and self._device.type == "cuda" and self.is_rank_zero:
            training.log_memory_stats(training.get_memory_stats(device=self._device))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        utils.log_rank_zero(
            log,
            f"model: {total:,} parameters, {trainable:,} trainable"
            + (" (LoRA + audio rows)" if self._lora else ""),
        )
        return model

    def _load_sharded(self, model: torch.nn.Module, cpu_offload: bool) -> None:
        """The checkpoint into the FSDP2-sharded ``model``. Only rank 0 reads it (memory-mapped
        safetensors; cast only where the model's dtype differs); it sends one tensor at a time
        and every rank keeps its shard (torch's ``broadcast_from_rank0``), so a host holds one
        copy of the checkpoint, not one per rank."""
        dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        state_dict = {}
        if self.is_rank_zero:
            state_dict = self._checkpointer.load_checkpoint()[training.MODEL_KEY]
            missing, unexpected = dtypes.keys() - state_dict.keys(), state_dict.keys() - dtypes
            if missing or unexpected:
                raise UserError(
                    f"the checkpoint in {self._checkpointer.checkpoint_dir} does not fit the "
                    f"model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
                )
            state_dict = {k: v.to(dtypes[k]) for k, v in state_dict.items()}
        options = StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, strict=True, cpu_offload=cpu_offload
        )
        set_model_state_dict(model, state_dict, options=options)

    def _build_loader(self, cfg: DictConfig, loader_state):
        """Builds the loader, then restores its position when resuming mid-epoch."""
        loader = build_dataloader(
            cfg.dataset,
            self._tokenizer,
            batch_size=cfg.batch_size,
            shuffle=cfg.shuffle,
            collate_fn=cfg.get("collate_fn", "torchtune.data.padded_collate_sft"),
            stream_batches=self.max_steps_per_epoch * self.grad_accum
            if self.max_steps_per_epoch
            else None,
            num_workers=cfg.get("num_workers", 0),
        )
        batches = len(loader) // self.grad_accum
        if self.max_steps_per_epoch is not None:
            batches = min(batches, self.max_steps_per_epoch)
        if batches == 0:
            raise UserError(
                f"the training split gives no batch of {cfg.batch_size} (x "
                f"{self.grad_accum} accumulation steps x {self.world_size} ranks): add data, "
                "lower batch_size or lower dataset.val_fraction"
            )
        self.steps_per_epoch = batches
        if loader_state is not None and self.global_step % self.steps_per_epoch:
            loader.load_state_dict(loader_state)  # mid-epoch: continue at the next batch
        return loader

    def _setup_validation(self, cfg: DictConfig):
        val = cfg.get("validation", None)
        self._val_every_n_steps = val.get("every_n_steps", 0) if val else 0
        self._val_max_batches = val.get("max_batches", None) if val else None
        if not self._val_every_n_steps:
            return None
        batch_size = val.get("batch_size", cfg.batch_size)
        loader = build_dataloader(
            val.dataset,
            self._tokenizer,
            batch_size=batch_size,
            shuffle=False,
            stream_batches=self._val_max_batches,
        )
        if len(loader) == 0:
            raise UserError(
                "validation is on (validation.every_n_steps > 0) but its split gives no batch "
                f"of {batch_size}: raise validation.dataset.val_fraction (and "
                "dataset.val_fraction with it), lower validation.batch_size, or set "
                "validation.every_n_steps=0"
            )
        return loader

    def _setup_profiler(self, cfg_profiler):
        """torchtune's profiler (``profiler.enabled: True``), or a no-op."""
        if cfg_profiler is None:
            cfg_profiler = DictConfig({"enabled": False})
        if cfg_profiler.get("_component_", None) is None:
            cfg_profiler["_component_"] = "torchtune.training.setup_torch_profiler"
        profiler, profiler_cfg = config.instantiate(cfg_profiler)
        self._profile_memory = profiler_cfg.get("profile_memory", False) and (
            self._device.type == "cuda"
        )
        self._profiler_wait = profiler_cfg.get("wait_steps", 0)
        self._profiler_warmup = profiler_cfg.get("warmup_steps", 0)
        self._profiler_active = profiler_cfg.get("active_steps", 0)
        return profiler

    # ---- checkpoints --------------------------------------------------------------------------
    def _write_hf(self, out_dir) -> None:
        """The Hugging Face checkpoint of the current weights (all ranks gather, rank 0 writes):
        the full model, with LoRA merged in, and for LoRA the adapter with the audio rows."""
        if self.world_size > 1:
            sd = training.gather_cpu_state_dict(self._model, self.is_rank_zero, self._device)
        else:
            sd = {k: v.detach().cpu().clone() for k, v in self._model.state_dict().items()}
        if not self.is_rank_zero:
            return
        adapter = adapter_config = None
        if self._lora:
            cfg = self._lora_cfg
            adapter = {**get_adapter_state_dict(sd), **audio_rows_state_dict(self._model)}
            sd = get_merged_lora_ckpt(sd, rank=cfg["r"], alpha=cfg["lora_alpha"])
            adapter_config = cfg
        self._checkpointer.save_hf(out_dir, sd, adapter, adapter_config)

    @property
    def _lora_cfg(self) -> Dict[str, Any]:
        m = self._cfg_model
        return {
            "r": m.lora_rank,
            "lora_alpha": m.lora_alpha,
            "target_modules": get_lora_module_names(
                list(m.lora_attn_modules),
                m.get("apply_lora_to_mlp", False),
                m.get("apply_lora_to_output", False),
            ),
            "peft_type": "LORA",
        }

    def save_checkpoint(self, hf: bool) -> None:
        total = self.total_epochs * self.steps_per_epoch
        train_state.save(
            self.output_dir,
            self.global_step,
            self._model,
            self._optimizer,
            recipe_state={
                "step": self.global_step,
                "epochs_run": self.epochs_run,
                "total_steps": total,
                "steps_per_epoch": self.steps_per_epoch,
                "must_match": self._must_match,
            },
            rank_state={"loader": self._dataloader.state_dict()},
            write_hf=self._write_hf if hf else None,
            keep_last=self.keep_last_n_checkpoints,
        )

    # ---- the loop -----------------------------------------------------------------------------
    def train_step(self, batch: Dict[str, torch.Tensor]) -> StepResult:
        """One batch: next-token cross-entropy, summed over its target tokens."""
        utils.batch_to_device(batch, self._device)
        loss, level, n = forward_loss(self._model, batch, self._loss_fn, self._activations_ctx)
        return StepResult(loss * n, n, n, level, {})

    def train(self) -> None:
        if self.finished:
            return
        gc.collect()
        if self._device.type == "cuda":
            training.cleanup_before_training()
        self._optimizer.zero_grad()
        running_loss = torch.zeros((), device=self._device)
        count = torch.zeros((), device=self._device)
        num_tokens = torch.zeros((), device=self._device, dtype=torch.long)
        stats = torch.zeros(4, device=self._device)
        metrics: Dict[str, torch.Tensor] = {}
        t0 = time.perf_counter()
        self._profiler.start()
        for curr_epoch in range(self.epochs_run, self.total_epochs):
            set_epoch(self._dataloader, curr_epoch)
            done = self.global_step - curr_epoch * self.steps_per_epoch
            pbar = tqdm(total=self.steps_per_epoch, initial=done, disable=not self.is_rank_zero)
            for idx, batch in enumerate(self._dataloader):
                if self.global_step - curr_epoch * self.steps_per_epoch == self.steps_per_epoch:
                    break
                profiled = curr_epoch == 0 and self._profile_memory
                if profiled and idx == self._profiler_wait + self._profiler_warmup:
                    torch.cuda.memory._record_memory_history()  # torch's documented recorder
                out = self.train_step(batch)
                running_loss += out.loss_sum.detach()
                count += out.count
                num_tokens += out.tokens
                stats += out.level_stats
                for name, value in out.metrics.items():
                    metrics[name] = metrics.get(name, 0) + value.detach()
                out.loss_sum.backward()
                if (idx + 1) % self.grad_accum:
                    continue

                # one optimizer step over the accumulated batches (and ranks)
                all_reduce(count, num_tokens, running_loss, stats, *metrics.values())
                # FSDP2 averages gradients over ranks: scale by world size / global count
                training.scale_grads(self._model, self.world_size / count)
                grad_norm = None
                if self.clip_grad_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        self._model.parameters(), max_norm=float(self.clip_grad_norm)
                    )
                    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
                        grad_norm = grad_norm.full_tensor()
                self._optimizer.step()
                self._optimizer.zero_grad(set_to_none=True)
                if self._lr_scheduler is not None:
                    self._lr_scheduler.step()
                self.global_step += 1

                step_loss = running_loss.item() / max(count.item(), 1)
                self.loss_history.append((self.global_step, step_loss))
                pbar.update(1)
                pbar.set_description(f"{curr_epoch + 1}|{self.global_step}|Loss: {step_loss:.4f}")
                if self.global_step % self.log_every_n_steps == 0 and self.is_rank_zero:
                    seconds = time.perf_counter() - t0
                    log_dict = {
                        "loss": step_loss,
                        "lr": get_lr(self._optimizer),
                        "tokens_per_second_per_gpu": num_tokens.item()
                        / (seconds * self.world_size),
                        **level_losses(stats),
                        **{k: v.item() / max(count.item(), 1) for k, v in metrics.items()},
                    }
                    if grad_norm is not None:
                        log_dict["grad_norm"] = float(grad_norm)
                    if self.log_peak_memory_stats:
                        log_dict.update(peak_memory_stats(self._device))
                    self._metric_logger.log_dict(log_dict, step=self.global_step)
                if self._val_dataloader is not None and (
                    self.global_step % self._val_every_n_steps == 0
                ):
                    self._log_validation()
                running_loss.zero_()
                count.zero_()
                num_tokens.zero_()
                stats.zero_()
                metrics.clear()
                if profiled and idx == (
                    self._profiler_wait + self._profiler_warmup + self._profiler_active
                ):
                    torch.cuda.memory._record_memory_history(enabled=None)
                self._profiler.step()

                epoch_end = self.global_step % self.steps_per_epoch == 0
                periodic = (
                    self.save_every_n_steps and self.global_step % self.save_every_n_steps == 0
                )
                if periodic and not epoch_end:
                    hf_every = self.save_hf_every_n_steps
                    self.save_checkpoint(hf=bool(hf_every and self.global_step % hf_every == 0))
                t0 = time.perf_counter()
            pbar.close()
            self.epochs_run += 1
            self.save_checkpoint(hf=True)
        self._profiler.stop()
        self._log_host_memory("at the end")

    def _log_host_memory(self, when: str) -> None:
        """Every rank's host memory (``log_peak_memory_stats``): what one rank costs a host."""
        if self.log_peak_memory_stats:
            memory = ", ".join(f"{k} {v:.2f} GiB" for k, v in host_memory_gib().items())
            log.info(f"rank {self.rank}: host memory {when}: {memory}")

    def _log_validation(self) -> None:
        val = validate(
            self._model, self._val_dataloader, self._loss_fn, self._device, self._val_max_batches
        )
        if self.is_rank_zero:
            log.info(
                f"step {self.global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items())
            )
            self._metric_logger.log_dict(val, step=self.global_step)

    def cleanup(self) -> None:
        if self.is_rank_zero and self._metric_logger is not None:
            self._metric_logger.close()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: DictConfig, recipe_cls=LlamaMimiFinetuneRecipe) -> LlamaMimiFinetuneRecipe:
    """Set up, train, clean up; returns the recipe (tests read its loss history)."""
    config.log_config(recipe_name=recipe_cls.__name__, cfg=cfg)
    recipe = recipe_cls(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()
    return recipe


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    import sys

    sys.exit(run_recipe(recipe_main, "llama_mimi_full", OPTIONAL_KEYS))
