"""The Llama-Mimi parts of the training recipe (recipes/llama_mimi_full.py), as plain functions:
vocabulary checks before the first step, the data loader (map-style or streaming), one forward
with its level losses, validation, and peak memory on CPU as well as CUDA.
"""

import contextlib
import resource
from functools import partial
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, training, utils
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_packed

from llama_mimi_tt.errors import UserError
from llama_mimi_tt.loss import LlamaMimiLoss
from llama_mimi_tt.recipe_config import component
from llama_mimi_tt.tokenizer import LlamaMimiTokenizer

IGNORE_INDEX = CROSS_ENTROPY_IGNORE_IDX  # torchtune's: its collators pad labels with it


def check_audio_setup(model, tokenizer, loss_fn) -> None:
    """Fails before any training step when the pieces disagree on the audio vocabulary."""
    if not isinstance(tokenizer, LlamaMimiTokenizer):
        raise UserError(
            f"tokenizer is {type(tokenizer).__name__}; Llama-Mimi recipes need "
            "llama_mimi_tt.llama_mimi_tokenizer (it adds the audio ids)"
        )
    vocab = tokenizer.vocab
    if not isinstance(loss_fn, LlamaMimiLoss):
        raise UserError(
            f"loss is {type(loss_fn).__name__}; the Llama-Mimi recipes need "
            "llama_mimi_tt.LlamaMimiLoss (it also measures the semantic and acoustic levels)"
        )
    if loss_fn.vocab != vocab:
        raise UserError(
            f"loss is set up for num_quantizers={loss_fn.vocab.num_quantizers}, "
            f"text_vocab_size={loss_fn.vocab.text_vocab_size} but the tokenizer for "
            f"num_quantizers={vocab.num_quantizers}, text_vocab_size={vocab.text_vocab_size}: "
            "set both from the same `num_quantizers` in the config"
        )
    rows = model.tok_embeddings.num_embeddings  # nn.Embedding or the LoRA ExtendedEmbedding
    if rows < vocab.size:
        raise UserError(
            f"the model embeds {rows} ids but num_quantizers={vocab.num_quantizers} needs "
            f"{vocab.size} (T={vocab.text_vocab_size} + 2048 * Q + 2): build the model with the "
            "same num_quantizers and text_vocab_size as the tokenizer"
        )


def check_max_seq_len(cfg_tokenizer: DictConfig) -> None:
    """A sequence holds at least <|begin_of_text|>, <audio> and one frame of Q codes."""
    max_seq_len = cfg_tokenizer.get("max_seq_len", None)
    q = cfg_tokenizer.get("num_quantizers", 4)
    if max_seq_len is not None and max_seq_len < 2 + q:
        raise UserError(
            f"max_seq_len={max_seq_len} is too short for one frame: a sequence needs at least "
            f"{2 + q} tokens (<|begin_of_text|>, <audio> and Q={q} codes)"
        )


def peak_memory_stats(device: torch.device) -> Dict[str, float]:
    """torchtune's CUDA stats, or this process's peak resident memory on CPU."""
    if device.type == "cpu":
        return {"peak_memory_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    return training.get_memory_stats(device=device)


def host_memory_gib() -> Dict[str, float]:
    """This process's host memory in GiB, from Linux's ``/proc/self/status``: resident now
    (``rss``), of it private (``rss_anon``) and mapped files (``rss_file``: memory-mapped
    safetensors, shared with other processes through the page cache), and the peak
    (``peak_rss``). Elsewhere only the peak."""
    fields = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file", "VmHWM": "peak_rss"}
    try:
        with open("/proc/self/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in fields:
            out[fields[key]] = int(value.split()[0]) / 2**20  # kB
    return out


# ---- data ---------------------------------------------------------------------------------------
class PermutationSampler(StatefulDistributedSampler):
    """torchdata's ``StatefulDistributedSampler`` (same order, same state, exact resume)
    without its Python list of every index (about 36 bytes an index): the permutation is one
    int32 tensor (torch draws the same one as in int64), this rank's share of it is handed out
    a block at a time, so tens of millions of packs cost ``4 bytes x packs`` for a moment and
    ``4 / world_size`` bytes after."""

    block = 65536

    def __iter__(self):
        start = self.next_yielded or 0
        self.next_yielded = None
        self.yielded = start
        n = len(self.dataset)
        dtype = torch.int32 if n < 2**31 else torch.int64
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g, dtype=dtype)
        else:
            order = torch.arange(n, dtype=dtype)
        if self.drop_last:
            order = order[: self.total_size]
        elif self.total_size > n:  # repeat from the start to divide evenly, as torch does
            order = order.repeat(-(-self.total_size // n))[: self.total_size]
        mine = order[self.rank : self.total_size : self.num_replicas]
        if self.num_replicas > 1:
            mine = mine.clone()  # and the whole permutation is freed
        del order
        for i in range(start, len(mine), self.block):
            for idx in mine[i : i + self.block].tolist():
                self.yielded += 1
                yield idx


class StreamingDataLoader(StatefulDataLoader):
    """A loader over a streaming (iterable) dataset whose epoch is ``steps`` batches: a stream
    has no length of its own."""

    def __init__(self, dataset, steps: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps


def build_dataloader(
    cfg_dataset: DictConfig,
    tokenizer,
    *,
    batch_size: int,
    shuffle: bool,
    collate_fn: str = "torchtune.data.padded_collate_sft",
    stream_batches: Optional[int] = None,
    state: Optional[Dict[str, Any]] = None,
    num_workers: int = 0,
) -> StatefulDataLoader:
    """The data loader of this rank: a :class:`PermutationSampler` over a map-style dataset
    (its position is part of a checkpoint), or, for ``dataset.streaming: True``, the stream
    itself (it shards by rank and shuffles in a buffer), ``stream_batches`` batches an epoch.
    ``num_workers`` processes read and build batches ahead of the step (0: in this process);
    the loader's state, and so a resume, is the same either way."""
    ds = config.instantiate(cfg_dataset, tokenizer)
    if cfg_dataset.get("packed", False):
        collate = padded_collate_packed
    else:
        collate = partial(
            component(collate_fn), padding_idx=tokenizer.pad_id, ignore_idx=IGNORE_INDEX
        )
    if cfg_dataset.get("streaming", False):
        if stream_batches is None:
            raise UserError(
                "dataset.streaming=True has no length: set max_steps_per_epoch (the batches "
                "that make one epoch on each rank)"
            )
        loader = StreamingDataLoader(
            ds,
            steps=stream_batches,
            batch_size=batch_size,
            collate_fn=collate,
            drop_last=True,
            num_workers=num_workers,
        )
    else:
        world_size, rank = utils.get_world_size_and_rank()
        sampler = PermutationSampler(
            ds, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=0
        )
        loader = StatefulDataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate,
            drop_last=True,
            num_workers=num_workers,
        )
    if state is not None:
        loader.load_state_dict(state)
    return loader


def set_epoch(loader: StatefulDataLoader, epoch: int) -> None:
    """Reshuffles: the sampler's permutation, or a stream's shuffle buffer."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    elif hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


# ---- one forward, validation --------------------------------------------------------------------
def forward_loss(model, batch: Dict[str, torch.Tensor], loss_fn: LlamaMimiLoss, ctx):
    """``(token-mean loss, level_stats, number of target tokens)`` of one batch: position t
    predicts token t + 1, and padding (``IGNORE_INDEX``) never counts."""
    labels = batch.pop("labels")
    labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    with ctx:
        logits = model(**batch)
    loss, level_stats = loss_fn.loss_and_level_stats(logits, labels)
    return loss, level_stats, (labels != IGNORE_INDEX).sum()


def all_reduce(*tensors: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)


def level_losses(stats: torch.Tensor, prefix: str = "") -> Dict[str, float]:
    """``semantic_loss`` (level 0) and ``acoustic_loss`` (levels 1..Q-1) from summed stats."""
    s = stats.tolist()
    out = {}
    if s[1]:
        out[prefix + "semantic_loss"] = s[0] / s[1]
    if s[3]:
        out[prefix + "acoustic_loss"] = s[2] / s[3]
    return out


@torch.no_grad()
def validate(model, loader, loss_fn, device, max_batches: Optional[int] = None) -> Dict[str, float]:
    """Token-mean loss and level losses on the held-out split (summed over ranks)."""
    model.eval()
    total = torch.zeros((), device=device)
    tokens = torch.zeros((), device=device, dtype=torch.long)
    stats = torch.zeros(4, device=device)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        utils.batch_to_device(batch, device)
        loss, level, n = forward_loss(model, batch, loss_fn, contextlib.nullcontext())
        total += loss * n
        tokens += n
        stats += level
    all_reduce(total, tokens, stats)
    model.train()
    out = {"val_loss": (total / tokens.clamp(min=1)).item()}
    out.update(level_losses(stats, "val_"))
    return out
