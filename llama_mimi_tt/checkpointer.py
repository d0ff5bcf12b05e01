"""Checkpoints in and out in Hugging Face format (DESIGN.md, contract 3).

In: a base Llama 3.x checkpoint (text vocabulary only; the audio rows are created) or a
Llama-Mimi one (vocabulary already extended; loaded as it is, after checking it agrees with the
config). Out: what transformers loads with no code of ours: safetensors shards, config.json with
the extended ``vocab_size`` and ``num_quantizers``, and the tokenizer with the audio tokens.
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from safetensors.torch import save_file
from torchtune import training
from torchtune.training.checkpointing import FullModelHFCheckpointer
from torchtune.training.checkpointing._utils import (
    ADAPTER_MODEL_FNAME,
    get_adapter_checkpoint_path,
    get_recipe_checkpoint_path,
)
from torchtune.utils import get_logger

from llama_mimi_tt.hf_export import (
    add_audio_tokens,
    find_text_tokenizer,
    llama_mimi_hf_config,
    load_text_tokenizer,
    write_tokenizer,
)
from llama_mimi_tt.modules import AUDIO_WEIGHT
from llama_mimi_tt.vocab import LLAMA3_TEXT_VOCAB_SIZE, MimiVocab

log = get_logger("INFO")

AUDIO_ROWS_SEED = 20250918  # the paper's arXiv date; fixed so every run starts the same
# torchtune keys of the weights that have one row per token id
VOCAB_KEYS = ("tok_embeddings.weight", "output.weight")
AUDIO_ROWS_FNAME = "audio_rows.safetensors"


@torch.no_grad()
def init_audio_rows(text_rows: torch.Tensor, num_rows: int, seed: int = AUDIO_ROWS_SEED):
    """New rows for a vocabulary weight, from the statistics of its text rows.

    Rule: per dimension ``d``, ``row[d] = mean[d] + std[d] * z[d]`` where ``mean`` and ``std``
    are the per-dimension mean and (unbiased) standard deviation of the text rows, computed in
    float32, and ``z ~ N(0, 1)`` comes from a CPU ``torch.Generator`` seeded with ``seed``
    (``torch.randn(num_rows, dim)``). Returned in the text rows' dtype. The same checkpoint and
    seed give the same rows on any machine.
    """
    w = text_rows.float()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(num_rows, w.shape[1], generator=gen)
    return (w.mean(0) + w.std(0) * z).to(text_rows.dtype)


class LlamaMimiCheckpointer(FullModelHFCheckpointer):
    """torchtune's ``FullModelHFCheckpointer`` for Llama-Mimi: the same HF format and layout
    (``epoch_N/`` folders), plus what the extended vocabulary needs at both ends.

    It differs from its parent only where the vocabulary is touched: loading adds (or checks)
    the audio rows, saving writes config.json and the tokenizer of the extended vocabulary and
    keeps the trained audio rows of a LoRA run with its adapter.

    Loading (``load_checkpoint``), by the number of rows of ``tok_embeddings``:

    - T (a base Llama 3.x; config.json ``vocab_size`` must be T): the audio rows of the embedding
      and of an untied output projection are appended, by ``init_audio_rows`` (per-dimension
      mean + std * N(0, 1) of that weight's text rows, generator seeded with ``audio_init_seed``).
    - T + C * Q + 2, or that padded (a Llama-Mimi checkpoint): loaded as it is, after checking
      its config.json ``num_quantizers`` (and ``text_vocab_size``) when present; rows up to the
      model's padded size are added by the same rule.
    - anything else: a ValueError that says which Q (or which T) the checkpoint was made for.

    On resume of a LoRA run the trained audio rows in the adapter checkpoint replace those of
    the base model.

    Saving (``save_checkpoint``): torchtune writes the shards as usual; then config.json gets the
    extended ``vocab_size``, ``num_quantizers`` and ``text_vocab_size``, and ``tokenizer.json``,
    ``tokenizer_config.json``, ``special_tokens_map.json`` are written with ``<c_q>`` (c outer, q
    inner), ``<audio>``, ``</audio>`` after the text vocabulary (from the base ``tokenizer.json``,
    or converted from Meta's tiktoken ``original/tokenizer.model``). For a LoRA run the adapter
    checkpoint ``adapter_model.pt`` also holds the audio rows (``tok_embeddings.audio_weight``,
    ``output.audio_weight``), which are written to ``audio_rows.safetensors`` as well; the
    merged model (``model-*.safetensors``) is the full Llama-Mimi.

    Args:
        checkpoint_dir (str): HF checkpoint directory (config.json, safetensors).
        checkpoint_files (Union[List[str], Dict[str, str]]): as torchtune's.
        model_type (str): ``LLAMA3_2`` (1B, tiny) or ``LLAMA3`` (8B).
        output_dir (str): where ``epoch_N/`` folders go.
        num_quantizers (int): Q, as in the model and tokenizer config.
        text_vocab_size (int): T of the base model (128256 for Llama 3.x).
        pad_vocab_to_multiple_of (int): as given to the model builder.
        tokenizer_path (Optional[str]): where the text tokenizer is (a directory or file);
            default: ``checkpoint_dir``.
        audio_init_seed (int): seed of ``init_audio_rows``.
        **kwargs: the other arguments of ``FullModelHFCheckpointer`` (adapter_checkpoint,
            recipe_checkpoint, safe_serialization, should_load_recipe_state, ...).
    """

    def __init__(
        self,
        checkpoint_dir: str,
        checkpoint_files: Union[List[str], Dict[str, str]],
        model_type: str,
        output_dir: str,
        num_quantizers: int = 4,
        text_vocab_size: int = LLAMA3_TEXT_VOCAB_SIZE,
        pad_vocab_to_multiple_of: int = 1,
        tokenizer_path: Optional[str] = None,
        audio_init_seed: int = AUDIO_ROWS_SEED,
        **kwargs,
    ):
        if model_type not in ("LLAMA3_2", "LLAMA3"):
            raise ValueError(
                f"model_type must be LLAMA3_2 (Llama-Mimi-1.3B, tiny) or LLAMA3 (Llama-Mimi-8B), "
                f"got {model_type!r}"
            )
        if not kwargs.get("safe_serialization", True):
            raise ValueError(
                "LlamaMimiCheckpointer writes safetensors only: drop safe_serialization"
            )
        # torchtune 0.6.1 resumes a full fine-tune from files named like checkpoint_files directly
        # in output_dir, where nothing is saved: we resume from the newest output_dir/epoch_N
        resume = kwargs.pop("resume_from_checkpoint", False)
        resume = kwargs.pop("should_load_recipe_state", False) or resume
        super().__init__(checkpoint_dir, checkpoint_files, model_type, output_dir, **kwargs)
        if resume:
            self._set_up_resume(kwargs.get("recipe_checkpoint"), kwargs.get("adapter_checkpoint"))
        self.vocab = MimiVocab(text_vocab_size=text_vocab_size, num_quantizers=num_quantizers)
        self.vocab_size = self.vocab.padded_size(pad_vocab_to_multiple_of)
        self.audio_init_seed = audio_init_seed
        self._tokenizer_source = find_text_tokenizer(tokenizer_path or checkpoint_dir)
        self._tokenizer = None  # built on first save (a tiktoken conversion takes a few seconds)
        self._check_config()

    # ---- in -----------------------------------------------------------------------------
    def _set_up_resume(self, recipe_checkpoint, adapter_checkpoint) -> None:
        out = self._output_dir
        self._should_load_recipe_state = True
        self._recipe_checkpoint = get_recipe_checkpoint_path(
            output_dir=out, recipe_checkpoint=recipe_checkpoint, should_load_recipe_state=True
        )
        self._adapter_checkpoint = get_adapter_checkpoint_path(
            output_dir=out,
            adapter_checkpoint=adapter_checkpoint,
            should_load_recipe_state=True,
            pattern=r"^epoch_(\d+)",
        )
        if self._adapter_checkpoint is not None:
            return  # LoRA: base weights from checkpoint_dir, adapters + audio rows from epoch_N
        epochs = sorted(
            (d for d in out.glob("epoch_*") if d.name[6:].isdigit()), key=lambda d: int(d.name[6:])
        )
        shards = sorted(epochs[-1].glob("model-*.safetensors")) if epochs else []
        if not shards:
            raise FileNotFoundError(
                f"resume_from_checkpoint=True but {out} has no epoch_N/model-*.safetensors: "
                "resume with the output_dir of the interrupted run"
            )
        self._checkpoint_paths = shards
        log.info(f"Resuming from {epochs[-1]} and {self._recipe_checkpoint}")

    def _check_config(self) -> None:
        """Fails early when config.json disagrees with the Llama-Mimi config."""
        cfg, v = self._config, self.vocab
        where = self._checkpoint_dir / "config.json"
        q = cfg.get("num_quantizers")
        if q is not None and q != v.num_quantizers:
            raise ValueError(
                f"{where} has num_quantizers={q} but the config says num_quantizers="
                f"{v.num_quantizers}: set num_quantizers={q} in the model, tokenizer, loss and "
                "checkpointer (a Llama-Mimi model is trained for one Q)"
            )
        t = cfg.get("text_vocab_size")
        if t is not None and t != v.text_vocab_size:
            raise ValueError(
                f"{where} has text_vocab_size={t} but the config says text_vocab_size="
                f"{v.text_vocab_size}"
            )

    def _rows_error(self, rows: int) -> ValueError:
        v = self.vocab
        where = self._checkpoint_dir
        extra = rows - v.text_vocab_size - 2
        if extra > 0 and extra % v.codebook_size == 0:
            q = extra // v.codebook_size
            why = (
                f"that is T + C * Q + 2 for num_quantizers={q}, but the config says "
                f"num_quantizers={v.num_quantizers}: set num_quantizers={q} everywhere"
            )
        else:
            why = (
                f"neither the text vocabulary T={v.text_vocab_size} (a base Llama 3) nor "
                f"T + C * Q + 2 = {v.size} (Llama-Mimi, Q={v.num_quantizers}) up to the padded "
                f"size {self.vocab_size}: check text_vocab_size, num_quantizers and "
                "pad_vocab_to_multiple_of"
            )
        return ValueError(f"the checkpoint in {where} has a vocabulary of {rows} rows; {why}")

    def _extend(self, sd: Dict[str, torch.Tensor], adapter: Optional[Dict]) -> None:
        v = self.vocab
        rows = sd["tok_embeddings.weight"].shape[0]
        base = rows == v.text_vocab_size
        if base:
            n = self._config.get("vocab_size", rows)
            if n != rows:
                raise ValueError(
                    f"{self._checkpoint_dir / 'config.json'} has vocab_size={n} but the "
                    f"embedding has {rows} rows"
                )
        elif not v.size <= rows <= self.vocab_size:
            raise self._rows_error(rows)
        if self._config.get("tie_word_embeddings", False):
            sd.pop("output.weight", None)  # a tied checkpoint that stored the copy anyway
            self._weight_map.pop("lm_head.weight", None)
        for key in VOCAB_KEYS:
            if key not in sd:
                continue
            w = sd[key]
            if w.shape[0] != rows:
                raise ValueError(f"{key} has {w.shape[0]} rows but tok_embeddings has {rows}")
            if rows < self.vocab_size:
                new = init_audio_rows(
                    w[: v.text_vocab_size], self.vocab_size - rows, self.audio_init_seed
                )
                sd[key] = torch.cat([w, new.to(w.device)])
            audio_key = key.replace("weight", AUDIO_WEIGHT)
            if adapter is not None and audio_key in adapter:  # trained rows of a LoRA run
                sd[key][v.text_vocab_size :] = adapter.pop(audio_key).to(sd[key].dtype)
        if base:
            log.info(
                f"Base checkpoint: added {self.vocab_size - rows} audio rows (Q="
                f"{v.num_quantizers}) to {', '.join(k for k in VOCAB_KEYS if k in sd)}, "
                f"initialised from the text rows' statistics (seed {self.audio_init_seed})"
            )

    def load_checkpoint(self) -> Dict[str, Any]:
        """torchtune's load, then the audio rows added or checked (see the class docstring)."""
        state_dict = super().load_checkpoint()
        self._extend(state_dict[training.MODEL_KEY], state_dict.get(training.ADAPTER_KEY))
        return state_dict

    # ---- out ----------------------------------------------------------------------------
    def _audio_rows(self, state_dict: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """The audio rows of a LoRA run: from the adapter dict (native keys, if a recipe put
        them there) or else from the full model state dict."""
        adapter = state_dict.get(training.ADAPTER_KEY) or {}
        rows = {k: adapter.pop(k) for k in list(adapter) if k.endswith(AUDIO_WEIGHT)}
        model = state_dict.get(training.MODEL_KEY)
        if not rows and model is not None:
            t = self.vocab.text_vocab_size
            for key in VOCAB_KEYS:
                if key not in model:
                    continue
                w = model[key][t:]
                lora_a = adapter.get(key.replace("weight", "lora_a.weight"))
                if lora_a is not None:  # LoRA on the output was merged in: take it out again
                    cfg = state_dict.get(training.ADAPTER_CONFIG)
                    if cfg is None:
                        raise ValueError(
                            f"{key} has LoRA merged in but the state dict has no "
                            f"{training.ADAPTER_CONFIG!r} (rank, alpha) to take it out"
                        )
                    lora_b = adapter[key.replace("weight", "lora_b.weight")][t:]
                    delta = (cfg["lora_alpha"] / cfg["r"]) * (lora_b.float() @ lora_a.float())
                    w = (w.float() - delta).to(w.dtype)
                rows[key.replace("weight", AUDIO_WEIGHT)] = w.contiguous()
        return rows

    def save_checkpoint(
        self,
        state_dict: Dict[str, Any],
        epoch: int,
        intermediate_checkpoint: bool = False,
        adapter_only: bool = False,
    ) -> None:
        """torchtune's save, then config.json, the tokenizer files and (LoRA) the audio rows."""
        audio_rows = {}
        adapter = state_dict.get(training.ADAPTER_KEY)
        if adapter is not None:
            audio_rows = self._audio_rows(state_dict)
            if not audio_rows:
                log.warning(
                    "The adapter checkpoint has no audio rows: with save_adapter_weights_only="
                    "True torchtune's recipe does not pass the trained audio rows to the "
                    "checkpointer (add llama_mimi_tt.modules.audio_rows_state_dict(model) to "
                    "the adapter dict, or save the merged model too)"
                )
        if training.MODEL_KEY in state_dict:
            rows = state_dict[training.MODEL_KEY]["tok_embeddings.weight"].shape[0]
            if rows != self.vocab_size:
                raise ValueError(
                    f"the model to save has {rows} vocabulary rows, the checkpointer expects "
                    f"{self.vocab_size} (num_quantizers={self.vocab.num_quantizers})"
                )
        super().save_checkpoint(
            state_dict,
            epoch,
            intermediate_checkpoint=intermediate_checkpoint,
            adapter_only=adapter_only,
        )
        out = self._output_dir / f"epoch_{epoch}"
        if audio_rows:
            # adapter_model.pt (torchtune's adapter file, read back on resume) with the audio rows
            # beside the LoRA weights; the PEFT adapter file keeps LoRA weights only
            torch.save({**adapter, **audio_rows}, (out / ADAPTER_MODEL_FNAME).with_suffix(".pt"))
            save_file(
                {k: v.contiguous() for k, v in audio_rows.items()},
                out / AUDIO_ROWS_FNAME,
                metadata={"text_vocab_size": str(self.vocab.text_vocab_size)},
            )
        self.write_hf_files(out)

    def write_hf_files(self, out_dir: Union[str, Path]) -> None:
        """config.json and the tokenizer files of the extended vocabulary into ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = llama_mimi_hf_config(self._config, self.vocab, self.vocab_size)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if self._tokenizer is None:
            tok, tok_config, file = load_text_tokenizer(str(self._tokenizer_source))
            self._tokenizer = (add_audio_tokens(tok, self.vocab, str(file)), tok_config)
        write_tokenizer(out_dir, self._tokenizer[0], self.vocab, self._tokenizer[1])
