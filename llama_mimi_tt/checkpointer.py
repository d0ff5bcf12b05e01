"""Checkpoints in and out in Hugging Face format, the format of the released Llama-Mimi models.

In: a folder is enough: a base Llama 3.x (text vocabulary only; the audio rows are created), a
released Llama-Mimi, or one of our own checkpoints. The weight files come from
``model.safetensors.index.json`` or, without one, the folder's ``model*.safetensors``. Out: what
transformers loads with no code of ours: safetensors shards with their index, config.json with
the extended ``vocab_size`` and ``num_quantizers``, and the tokenizer with the audio tokens; for
a LoRA run also the adapter: ``adapter_model.pt`` (torchtune keys: LoRA and the trained audio
rows) and PEFT's ``adapter_model.safetensors`` + ``adapter_config.json`` (LoRA only).

Keys are converted with torchtune's public ``convert_weights`` (``hf_to_tune`` / ``tune_to_hf``).

The checkpointer also takes every argument and call torchtune's own recipes give a checkpointer
(``full_finetune_*``, ``lora_finetune_*``: ``should_load_recipe_state``, ``recipe_checkpoint``,
``adapter_checkpoint``, ``save_checkpoint(..., intermediate_checkpoint, adapter_only)``), with
torchtune's ``FullModelHFCheckpointer`` layout: ``output_dir/epoch_N/`` and
``output_dir/recipe_state/recipe_state.pt``.
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torchtune import training
from torchtune.models import convert_weights
from torchtune.modules import TiedLinear
from torchtune.training.checkpointing import FormattedCheckpointFiles, get_largest_iter_folder
from torchtune.utils import get_logger

from llama_mimi_tt.atomic_files import replacing
from llama_mimi_tt.errors import MissingFileError, UserError
from llama_mimi_tt.hf_export import (
    add_audio_tokens,
    llama_mimi_hf_config,
    load_text_tokenizer,
    write_tokenizer,
)
from llama_mimi_tt.modules import AUDIO_WEIGHT
from llama_mimi_tt.tokenizer import find_text_tokenizer
from llama_mimi_tt.vocab import LLAMA3_TEXT_VOCAB_SIZE, MimiVocab

log = get_logger("INFO")

AUDIO_ROWS_SEED = 20250918  # the paper's arXiv date; fixed so every run starts the same
# torchtune keys of the weights that have one row per token id
VOCAB_KEYS = ("tok_embeddings.weight", "output.weight")
INDEX_FNAME = "model.safetensors.index.json"
ADAPTER_FNAME = "adapter_model"  # .pt (torchtune keys + audio rows), .safetensors (PEFT)
MAX_SHARD_BYTES = 5 * 2**30
# torchtune's FullModelHFCheckpointer layout, which its recipes resume from
RECIPE_STATE_FILE = Path("recipe_state") / "recipe_state.pt"
EPOCH_DIR = r"^epoch_(\d+)"


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


def weight_files(folder: Path, checkpoint_files: Optional[List[str]] = None) -> List[Path]:
    """The safetensors files of a checkpoint folder: as given, from the index, or by glob."""
    listed_by = "checkpoint_files"
    if checkpoint_files:
        files = [folder / f for f in checkpoint_files]
    elif (folder / INDEX_FNAME).is_file():
        listed_by = INDEX_FNAME
        try:
            index = json.loads((folder / INDEX_FNAME).read_text())
            files = [folder / f for f in sorted(set(index["weight_map"].values()))]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{folder / INDEX_FNAME}: not a safetensors index ({e})") from None
    else:
        files = sorted(folder.glob("model*.safetensors"))
        if not files:
            raise MissingFileError(
                f"{folder} has no model*.safetensors and no {INDEX_FNAME}: point the config at "
                "a Hugging Face checkpoint folder (config.json + safetensors)"
            )
    for f in files:
        if not f.is_file():
            raise MissingFileError(f"{f}: weight file missing (listed by {listed_by})")
    return files


class LlamaMimiCheckpointer:
    """Loads a Llama 3 / Llama-Mimi checkpoint folder into torchtune's keys, and saves ours.

    Loading (``load_checkpoint``), by the number of rows of the embedding:

    - T (a base Llama 3.x; config.json ``vocab_size`` must be T): the audio rows of the embedding
      and of an untied output projection are appended, by ``init_audio_rows`` (per-dimension
      mean + std * N(0, 1) of that weight's text rows, generator seeded with ``audio_init_seed``).
    - T + C * Q + 2, or that padded (a Llama-Mimi checkpoint): loaded as it is, after checking
      its config.json ``num_quantizers`` (and ``text_vocab_size``) when present; rows up to the
      model's padded size are added by the same rule.
    - anything else: an error that says which Q (or which T) the checkpoint was made for.

    Saving (``save_hf``) writes one complete Hugging Face folder (see the module docstring).

    In torchtune's own recipes (``save_checkpoint`` / ``load_checkpoint`` with their arguments):
    ``save_checkpoint`` writes ``output_dir/epoch_N`` by ``save_hf``, and for a LoRA model with
    ``train_audio_rows=True`` puts the trained audio rows into the adapter (torchtune's adapter
    dict holds LoRA only; the rows are taken from the merged model); an intermediate checkpoint
    also writes the recipe state. With ``should_load_recipe_state`` (the recipe's
    ``resume_from_checkpoint: True``), ``load_checkpoint`` returns the recipe state too, the
    adapter of the newest ``epoch_N`` (LoRA: the model from ``checkpoint_dir``) or, without an
    adapter, the model of the newest ``epoch_N``, as torchtune's ``FullModelHFCheckpointer``.

    Args:
        checkpoint_dir (str): the checkpoint folder (config.json, safetensors).
        checkpoint_files (Optional[Union[List[str], Dict[str, str]]]): weight files in it
            (a list, or torchtune's ``filename_format`` / ``max_filename``); default: from the
            index or the folder's ``model*.safetensors``.
        model_type (str): ``LLAMA3_2`` (1B, tiny) or ``LLAMA3`` (8B).
        output_dir (Optional[str]): where ``save_checkpoint`` puts ``epoch_N/``.
        adapter_checkpoint (Optional[str]): on resume, the adapter file, relative to
            ``output_dir``; default: ``epoch_N/adapter_model.pt`` of the newest epoch, if any.
        recipe_checkpoint (Optional[str]): on resume, the recipe state file, relative to
            ``output_dir``; default: ``recipe_state/recipe_state.pt``.
        resume_from_checkpoint (bool): torchtune's deprecated name of
            ``should_load_recipe_state``.
        safe_serialization (bool): must be True: the weights are written as safetensors.
        should_load_recipe_state (bool): set by torchtune's recipes from their
            ``resume_from_checkpoint``: load the recipe state of a previous run.
        num_quantizers (int): Q, as in the model and tokenizer config.
        text_vocab_size (int): T of the base model (128256 for Llama 3.x).
        pad_vocab_to_multiple_of (int): as given to the model builder.
        tokenizer_path (Optional[str]): the text tokenizer (a folder or file) for ``save_hf``;
            default: ``checkpoint_dir``. Only looked up when saving.
        audio_init_seed (int): seed of ``init_audio_rows``.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        checkpoint_files: Optional[Union[List[str], Dict[str, str]]] = None,
        model_type: str = "LLAMA3_2",
        output_dir: Optional[str] = None,
        adapter_checkpoint: Optional[str] = None,
        recipe_checkpoint: Optional[str] = None,
        resume_from_checkpoint: bool = False,
        safe_serialization: bool = True,
        should_load_recipe_state: bool = False,
        num_quantizers: int = 4,
        text_vocab_size: int = LLAMA3_TEXT_VOCAB_SIZE,
        pad_vocab_to_multiple_of: int = 1,
        tokenizer_path: Optional[str] = None,
        audio_init_seed: int = AUDIO_ROWS_SEED,
    ):
        if model_type not in ("LLAMA3_2", "LLAMA3"):
            raise UserError(
                f"model_type must be LLAMA3_2 (Llama-Mimi-1.3B, tiny) or LLAMA3 (Llama-Mimi-8B), "
                f"got {model_type!r}"
            )
        if not safe_serialization:
            raise UserError(
                "LlamaMimiCheckpointer writes safetensors only: remove safe_serialization=False"
            )
        if hasattr(checkpoint_files, "keys"):  # torchtune's filename_format + max_filename
            checkpoint_files = FormattedCheckpointFiles.from_dict(
                dict(checkpoint_files)
            ).build_checkpoint_filenames()
        self.checkpoint_dir = Path(checkpoint_dir)
        self.checkpoint_files = list(checkpoint_files) if checkpoint_files else None
        self.output_dir = Path(output_dir) if output_dir else None
        self.should_load_recipe_state = should_load_recipe_state or resume_from_checkpoint
        self.adapter_checkpoint = adapter_checkpoint
        self.recipe_checkpoint = recipe_checkpoint
        if self.should_load_recipe_state and self.output_dir is None:
            raise UserError(
                "resume_from_checkpoint=True needs the checkpointer's output_dir (the previous "
                "run's epoch_N and recipe_state folders)"
            )
        self._loaded_audio_rows: Dict[str, torch.Tensor] = {}  # to tell trained rows at save
        self.vocab = MimiVocab(text_vocab_size=text_vocab_size, num_quantizers=num_quantizers)
        self.vocab_size = self.vocab.padded_size(pad_vocab_to_multiple_of)
        self.tokenizer_path = tokenizer_path or str(self.checkpoint_dir)
        self.audio_init_seed = audio_init_seed
        self._tokenizer = None  # built on first save (a tiktoken conversion takes a few seconds)
        self.config = self._read_config()
        self._check_config()

    # ---- in -----------------------------------------------------------------------------
    def _read_config(self) -> Dict:
        folder = self.checkpoint_dir
        if not folder.is_dir():
            raise MissingFileError(
                f"checkpoint folder {folder} does not exist: set it to a Hugging Face checkpoint "
                "folder (e.g. `tune download meta-llama/Llama-3.2-1B --output-dir DIR`)"
            )
        path = folder / "config.json"
        if not path.is_file():
            raise MissingFileError(
                f"{path} is missing: {folder} is not a Hugging Face checkpoint folder"
            )
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None

    def _check_config(self) -> None:
        """Fails early when config.json disagrees with the Llama-Mimi config."""
        cfg, v = self.config, self.vocab
        where = self.checkpoint_dir / "config.json"
        q = cfg.get("num_quantizers")
        if q is not None and q != v.num_quantizers:
            raise UserError(
                f"{where} has num_quantizers={q} but the config says num_quantizers="
                f"{v.num_quantizers}: set num_quantizers={q} in the model, tokenizer, loss and "
                "checkpointer (a Llama-Mimi model is trained for one Q)"
            )
        t = cfg.get("text_vocab_size")
        if t is not None and t != v.text_vocab_size:
            raise UserError(
                f"{where} has text_vocab_size={t} but the config says text_vocab_size="
                f"{v.text_vocab_size}"
            )

    def check_model(self, model: torch.nn.Module) -> None:
        """Fails naming the field and both values when config.json describes another
        architecture than ``model`` (layers, sizes, heads, tied embeddings, vocabulary, Q)."""
        where = self.checkpoint_dir / "config.json"
        attn, mlp = model.layers[0].attn, model.layers[0].mlp
        built = {
            "num_hidden_layers": len(model.layers),
            "hidden_size": model.tok_embeddings.embedding_dim,
            "num_attention_heads": attn.num_heads,
            "num_key_value_heads": attn.num_kv_heads,
            "intermediate_size": getattr(mlp.w1, "out_dim", getattr(mlp.w1, "out_features", None)),
            "tie_word_embeddings": isinstance(model.output, TiedLinear),
        }
        for field, value in built.items():
            saved = self.config.get(field)
            if field == "tie_word_embeddings" and saved is None:
                saved = False  # transformers' default
            if value is not None and saved is not None and saved != value:
                raise UserError(
                    f"{where} has {field}={saved} but the config's model has {value}: pick the "
                    "model builder that matches the checkpoint"
                )
        # vocabulary and Q: the model, the checkpointer and config.json must agree
        v, rows = self.vocab, model.tok_embeddings.num_embeddings
        if rows != self.vocab_size:
            raise UserError(
                f"the config's model has {rows} vocabulary rows but the checkpointer expects "
                f"{self.vocab_size} (text_vocab_size={v.text_vocab_size}, num_quantizers="
                f"{v.num_quantizers}): give the model and the checkpointer the same "
                "num_quantizers, text_vocab_size and pad_vocab_to_multiple_of"
            )
        saved = self.config.get("vocab_size")
        if saved is not None and saved != v.text_vocab_size and not v.size <= saved <= rows:
            raise self._rows_error(saved)

    def _rows_error(self, rows: int) -> UserError:
        v = self.vocab
        q = v.num_quantizers_of(rows)
        if q is not None:
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
        return UserError(
            f"the checkpoint in {self.checkpoint_dir} has a vocabulary of {rows} rows; {why}"
        )

    def _extend(self, sd: Dict[str, torch.Tensor]) -> None:
        v = self.vocab
        rows = sd["tok_embeddings.weight"].shape[0]
        base = rows == v.text_vocab_size
        if base:
            n = self.config.get("vocab_size", rows)
            if n != rows:
                raise UserError(
                    f"{self.checkpoint_dir / 'config.json'} has vocab_size={n} but the "
                    f"embedding has {rows} rows"
                )
        elif not v.size <= rows <= self.vocab_size:
            raise self._rows_error(rows)
        if self.config.get("tie_word_embeddings", False):
            sd.pop("output.weight", None)  # a tied checkpoint that stored the copy anyway
        for key in VOCAB_KEYS:
            if key not in sd:
                continue
            w = sd[key]
            if w.shape[0] != rows:
                raise UserError(f"{key} has {w.shape[0]} rows but tok_embeddings has {rows}")
            if rows < self.vocab_size:
                new = init_audio_rows(
                    w[: v.text_vocab_size], self.vocab_size - rows, self.audio_init_seed
                )
                sd[key] = torch.cat([w, new.to(w.device)])
        t = v.text_vocab_size
        self._loaded_audio_rows = {k: sd[k][t:].clone() for k in VOCAB_KEYS if k in sd}
        if base:
            log.info(
                f"Base checkpoint: added {self.vocab_size - rows} audio rows (Q="
                f"{v.num_quantizers}) to {', '.join(k for k in VOCAB_KEYS if k in sd)}, "
                f"initialised from the text rows' statistics (seed {self.audio_init_seed})"
            )

    def load_checkpoint(self) -> Dict[str, Any]:
        """``{"model": state dict}`` in torchtune's keys, audio rows added or checked; with
        ``should_load_recipe_state`` also the adapter (if any) and the recipe state of the
        previous run in ``output_dir`` (see the class docstring)."""
        if not self.should_load_recipe_state:
            return {
                training.MODEL_KEY: self._load_model(self.checkpoint_dir, self.checkpoint_files)
            }
        out_dir = self.output_dir
        newest = get_largest_iter_folder(out_dir, pattern=EPOCH_DIR) if out_dir.is_dir() else None
        if newest is None:
            raise MissingFileError(
                f"resume_from_checkpoint=True but {out_dir} has no epoch_N folder: run without "
                "resume, or point output_dir at the run to continue"
            )
        if self.adapter_checkpoint:
            adapter_path = out_dir / self.adapter_checkpoint
        else:
            adapter_path = out_dir / newest / f"{ADAPTER_FNAME}.pt"
        recipe_path = out_dir / (self.recipe_checkpoint or RECIPE_STATE_FILE)
        for path in ([adapter_path] if self.adapter_checkpoint else []) + [recipe_path]:
            if not path.is_file():
                raise MissingFileError(
                    f"{path} is missing: resume_from_checkpoint=True continues a run that saved "
                    "an intermediate checkpoint there"
                )
        out: Dict[str, Any] = {}
        if adapter_path.is_file():  # LoRA: the base model, then the trained adapter
            out[training.MODEL_KEY] = self._load_model(self.checkpoint_dir, self.checkpoint_files)
            out[training.ADAPTER_KEY] = torch.load(adapter_path, weights_only=True)
        else:  # full fine-tuning: the newest saved model
            out[training.MODEL_KEY] = self._load_model(out_dir / newest)
        out.update(torch.load(recipe_path, weights_only=True))
        log.info(f"Resuming from {out_dir / newest} and {recipe_path}")
        return out

    def _load_model(
        self, folder: Path, checkpoint_files: Optional[List[str]] = None
    ) -> Dict[str, torch.Tensor]:
        hf: Dict[str, torch.Tensor] = {}
        for f in weight_files(folder, checkpoint_files):
            try:
                hf.update(load_file(f))
            except (SafetensorError, OSError) as e:
                raise UserError(f"{f}: cannot read this safetensors file ({e})") from None
        if "model.embed_tokens.weight" not in hf:
            raise UserError(
                f"{folder}: the weight files have no model.embed_tokens.weight: "
                "not a Llama checkpoint, or a shard is missing from checkpoint_files"
            )
        c = self.config
        sd = convert_weights.hf_to_tune(
            hf,
            num_heads=c["num_attention_heads"],
            num_kv_heads=c["num_key_value_heads"],
            dim=c["hidden_size"],
            head_dim=c.get("head_dim"),
        )
        self._extend(sd)
        return sd

    # ---- out ----------------------------------------------------------------------------
    def save_hf(
        self,
        out_dir: Union[str, Path],
        model_state_dict: Dict[str, torch.Tensor],
        adapter_state_dict: Optional[Dict[str, torch.Tensor]] = None,
        adapter_config: Optional[Dict] = None,
    ) -> None:
        """One Hugging Face folder: weights (torchtune keys in, HF keys out), index,
        config.json, tokenizer; with an adapter also its files (see the module docstring).
        ``adapter_state_dict`` may hold the audio rows (``*.audio_weight``) beside LoRA."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = model_state_dict["tok_embeddings.weight"].shape[0]
        if rows != self.vocab_size:
            raise UserError(
                f"the model to save has {rows} vocabulary rows, the checkpointer expects "
                f"{self.vocab_size} (num_quantizers={self.vocab.num_quantizers})"
            )
        hf = convert_weights.tune_to_hf(model_state_dict, **self._shape())
        self._save_shards(out, {k: v.contiguous() for k, v in hf.items()})
        self._save_adapter(out, adapter_state_dict, adapter_config)
        self.write_hf_files(out)

    def _shape(self) -> Dict[str, Any]:
        c = self.config
        return dict(
            num_heads=c["num_attention_heads"],
            num_kv_heads=c["num_key_value_heads"],
            dim=c["hidden_size"],
            head_dim=c.get("head_dim"),
        )

    def _save_adapter(
        self,
        out: Path,
        adapter_state_dict: Optional[Dict[str, torch.Tensor]],
        adapter_config: Optional[Dict],
    ) -> None:
        if adapter_state_dict:
            # the adapter checkpoint is the one home of the trained audio rows; PEFT's
            # safetensors take the LoRA weights only (PEFT has no key for the audio rows)
            torch.save(adapter_state_dict, out / f"{ADAPTER_FNAME}.pt")
            lora = {k: v for k, v in adapter_state_dict.items() if not k.endswith(AUDIO_WEIGHT)}
            if lora:
                peft = convert_weights.tune_to_peft_adapter_weights(lora, **self._shape())
                save_file(
                    {k: v.contiguous() for k, v in peft.items()},
                    out / f"{ADAPTER_FNAME}.safetensors",
                    metadata={"format": "pt"},
                )
        if adapter_config:
            peft_config = convert_weights.tune_to_peft_adapter_config(
                adapter_config, base_model_name_or_path=str(self.checkpoint_dir)
            )
            (out / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")

    def _save_shards(self, out: Path, hf: Dict[str, torch.Tensor]) -> None:
        shards: List[Dict[str, torch.Tensor]] = [{}]
        size = total = 0
        for key, t in hf.items():
            n = t.numel() * t.element_size()
            if size and size + n > MAX_SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][key] = t
            size += n
            total += n
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FNAME).write_text(json.dumps(index, indent=2) + "\n")

    def save_checkpoint(
        self,
        state_dict: Dict[str, Any],
        epoch: int,
        intermediate_checkpoint: bool = False,
        adapter_only: bool = False,
    ) -> Path:
        """``output_dir/epoch_{epoch}`` as torchtune's recipes call it: the model by ``save_hf``
        (not with ``adapter_only``), the adapter (``adapter`` key) with the trained audio rows,
        and for an ``intermediate_checkpoint`` the rest of ``state_dict`` (optimizer, epoch,
        seed, data loader) in ``output_dir/recipe_state/recipe_state.pt``."""
        if self.output_dir is None:
            raise UserError("save_checkpoint needs the checkpointer's output_dir")
        out = self.output_dir / f"epoch_{epoch}"
        model = state_dict.get(training.MODEL_KEY)
        adapter = state_dict.get(training.ADAPTER_KEY)
        adapter_config = state_dict.get(training.ADAPTER_CONFIG)
        if (
            adapter is not None
            and model is not None
            and not any(k.endswith(AUDIO_WEIGHT) for k in adapter)
        ):
            # torchtune's recipes hand over LoRA only (get_adapter_state_dict): add the rows
            adapter = {**adapter, **self.trained_audio_rows(model, adapter, adapter_config)}
        if adapter_only:
            if adapter is None:
                raise UserError(
                    "save_checkpoint(adapter_only=True) got no adapter weights: the model has "
                    "no LoRA (set save_adapter_weights_only: False)"
                )
            log.warning(
                "save_adapter_weights_only: the adapter holds the LoRA weights only; audio rows "
                "trained with train_audio_rows=True are not in it (torchtune's recipe does not "
                "hand them over): set save_adapter_weights_only: False to keep them"
            )
            out.mkdir(parents=True, exist_ok=True)
            self._save_adapter(out, adapter, adapter_config)
            self.write_hf_files(out)
        elif model is None:
            raise UserError(f"save_checkpoint got no {training.MODEL_KEY!r} weights to save")
        else:
            self.save_hf(out, model, adapter, adapter_config)
        if intermediate_checkpoint:
            skip = (training.MODEL_KEY, training.ADAPTER_KEY, training.ADAPTER_CONFIG)
            recipe_state = {k: v for k, v in state_dict.items() if k not in skip}
            path = self.output_dir / RECIPE_STATE_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            with replacing(path) as tmp:  # never a half-written recipe state
                torch.save(recipe_state, tmp)
        log.info(f"Saved {out}" + (" and the recipe state" if intermediate_checkpoint else ""))
        return out

    def trained_audio_rows(
        self,
        model_state_dict: Dict[str, torch.Tensor],
        adapter_state_dict: Dict[str, torch.Tensor],
        adapter_config: Optional[Dict] = None,
    ) -> Dict[str, torch.Tensor]:
        """The audio rows of a LoRA model built with ``train_audio_rows=True``, under their
        adapter keys (``tok_embeddings.audio_weight``, ``output.audio_weight`` when untied), from
        the merged state dict a torchtune recipe saves; empty when the embedding's audio rows
        are those this checkpointer loaded (frozen: ``train_audio_rows=False``). A LoRA update
        of the output (``apply_lora_to_output``), merged into ``output.weight``, is taken off
        again (to float rounding): the adapter keeps the raw rows beside ``output.lora_*``."""
        t = self.vocab.text_vocab_size
        emb = model_state_dict["tok_embeddings.weight"]
        loaded = self._loaded_audio_rows.get("tok_embeddings.weight")
        if loaded is not None and torch.equal(emb[t:].cpu(), loaded):
            return {}
        out = {f"tok_embeddings.{AUDIO_WEIGHT}": emb[t:].detach().cpu().clone()}
        if "output.weight" in model_state_dict:
            rows = model_state_dict["output.weight"][t:].detach().cpu().float()
            if "output.lora_a.weight" in adapter_state_dict:
                if not adapter_config:
                    raise UserError(
                        "the adapter has LoRA on the output but no adapter config (r, "
                        "lora_alpha) to take it off the merged audio rows"
                    )
                scale = adapter_config["lora_alpha"] / adapter_config["r"]
                a = adapter_state_dict["output.lora_a.weight"].cpu().float()
                b = adapter_state_dict["output.lora_b.weight"][t:].cpu().float()
                rows = rows - scale * (b @ a)
            out[f"output.{AUDIO_WEIGHT}"] = rows.to(model_state_dict["output.weight"].dtype)
        return out

    def write_hf_files(self, out_dir: Union[str, Path]) -> None:
        """config.json and the tokenizer files of the extended vocabulary into ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = llama_mimi_hf_config(self.config, self.vocab, self.vocab_size)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if self._tokenizer is None:
            source = find_text_tokenizer(self.tokenizer_path)
            tok, tok_config, file = load_text_tokenizer(str(source))
            self._tokenizer = (add_audio_tokens(tok, self.vocab, str(file)), tok_config)
        write_tokenizer(out_dir, self._tokenizer[0], self.vocab, self._tokenizer[1])
