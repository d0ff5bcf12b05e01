"""torchtune's own recipes (``tune run full_finetune_single_device`` / ``lora_finetune_single_device``,
as shipped) train Llama-Mimi from a random tiny base Llama 3 folder with our model builders,
tokenizer, dataset and checkpointer; what they save loads in our generate recipe and in
transformers. And the checkpointer keeps torchtune's resume contract (recipe state, adapter)."""

from pathlib import Path

import pytest
import torch
from torchtune import training

from llama_mimi_tt import LlamaMimiCheckpointer, llama_mimi_tiny, lora_llama_mimi_tiny
from tests.test_checkpoint_folders import tune_generate
from tests.test_recipes import losses_from_log, training_inputs, tune_run

STOCK = Path(__file__).parents[1] / "configs" / "stock"
T = 512


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return training_inputs(tmp_path_factory.mktemp("stock"))


def checkpointer(folder, **kwargs):
    return LlamaMimiCheckpointer(str(folder), num_quantizers=4, text_vocab_size=T, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, config",
    [
        ("full_finetune_single_device", "tiny_full_single_device"),
        ("lora_finetune_single_device", "tiny_lora_single_device"),
    ],
)
def test_stock_recipe_trains_from_a_base_llama_and_its_output_loads(workdir, recipe, config):
    out = workdir / recipe
    args = [f"cache_dir={workdir / 'codes'}", f"base_dir={workdir / 'base'}"]
    args += [f"output_dir={out}", "max_steps_per_epoch=3"]
    tune_run([recipe, "--config", str(STOCK / f"{config}.yaml"), *args], cwd=workdir)
    losses = [loss for _, loss in losses_from_log(out)]
    print(f"{recipe}: loss {' -> '.join(f'{v:.4f}' for v in losses)}")
    assert len(losses) == 3 and losses[-1] < losses[0]

    final = out / "epoch_0"
    trained = checkpointer(final).load_checkpoint()[training.MODEL_KEY]
    init = checkpointer(workdir / "base").load_checkpoint()[training.MODEL_KEY]
    emb, emb0 = trained["tok_embeddings.weight"], init["tok_embeddings.weight"]
    assert emb.shape == emb0.shape == (T + 2048 * 4 + 2, 128)
    assert not torch.equal(emb[T:], emb0[T:])  # the audio rows trained (LoRA: as adapters)
    if recipe.startswith("lora"):
        assert torch.equal(emb[:T], emb0[:T])  # the text rows stay frozen
        adapter = torch.load(final / "adapter_model.pt", weights_only=True)
        assert torch.equal(adapter["tok_embeddings.audio_weight"], emb[T:])
        assert any(".lora_a." in k for k in adapter)
        # base + adapter = the merged model: the adapter is complete
        lora = lora_llama_mimi_tiny(
            lora_attn_modules=["q_proj", "v_proj", "output_proj"],
            apply_lora_to_mlp=True,
            lora_rank=8,
            lora_alpha=16,
            num_quantizers=4,
            text_vocab_size=T,
        ).eval()
        lora.load_state_dict(init, strict=False)
        assert not lora.load_state_dict(adapter, strict=False).unexpected_keys
        merged = llama_mimi_tiny(num_quantizers=4).eval()
        merged.load_state_dict(trained)
        ids = torch.tensor([[256, 8704, *range(600, 640)]])
        with torch.no_grad():
            torch.testing.assert_close(lora(ids), merged(ids), atol=1e-4, rtol=0)

    # transformers loads it, with our model's logits
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ours = llama_mimi_tiny(num_quantizers=4).eval()
    ours.load_state_dict(trained)
    ids = torch.tensor([[256, 8704, *range(600, 640), 8705]])
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    print(f"{recipe}: max |logit diff| transformers vs ours = {diff:.2e}")
    assert diff < 1e-4

    # and our generate recipe, by model_dir only
    summary = tune_generate(final, workdir / f"gen_{recipe}")
    print(f"{recipe}: generated {summary['frames']} frames from {final}")
    assert summary["random_weights"] is False and summary["frames"] > 0


def test_checkpointer_keeps_torchtunes_resume_contract(workdir, tmp_path):
    """An intermediate save then ``should_load_recipe_state=True`` gives back what torchtune's
    recipes read: the model of the newest epoch (full) or base + adapter (LoRA), and the recipe
    state keys."""
    base = workdir / "base"
    out = tmp_path / "out"
    model = checkpointer(base, output_dir=str(out)).load_checkpoint()[training.MODEL_KEY]
    model["tok_embeddings.weight"][T:] += 1.0  # "trained" audio rows
    state = {training.SEED_KEY: 3, training.EPOCHS_KEY: 1, training.MAX_STEPS_KEY: 5}
    ckpt = checkpointer(base, output_dir=str(out))
    ckpt.load_checkpoint()
    ckpt.save_checkpoint(
        {training.MODEL_KEY: model, **state}, epoch=0, intermediate_checkpoint=True
    )
    assert (out / "recipe_state" / "recipe_state.pt").is_file()

    resumed = checkpointer(base, output_dir=str(out), should_load_recipe_state=True)
    got = resumed.load_checkpoint()
    assert {k: got[k] for k in state} == state and training.ADAPTER_KEY not in got
    assert torch.equal(
        got[training.MODEL_KEY]["tok_embeddings.weight"], model["tok_embeddings.weight"]
    )

    # LoRA: torchtune's adapter dict has LoRA only; the checkpointer adds the trained rows
    lora = {"layers.0.attn.q_proj.lora_a.weight": torch.ones(8, 128)}
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "peft_type": "LORA"}
    ckpt.save_checkpoint(
        {training.MODEL_KEY: model, training.ADAPTER_KEY: lora, training.ADAPTER_CONFIG: config},
        epoch=1,
        intermediate_checkpoint=True,
        adapter_only=False,
    )
    got = checkpointer(base, output_dir=str(out), resume_from_checkpoint=True).load_checkpoint()
    adapter = got[training.ADAPTER_KEY]
    assert set(adapter) == {*lora, "tok_embeddings.audio_weight"}
    assert torch.equal(adapter["tok_embeddings.audio_weight"], model["tok_embeddings.weight"][T:])
    # LoRA resumes from the base model (the adapter brings the training)
    base_rows = checkpointer(base).load_checkpoint()[training.MODEL_KEY]["tok_embeddings.weight"]
    assert torch.equal(got[training.MODEL_KEY]["tok_embeddings.weight"], base_rows)

    # frozen audio rows (train_audio_rows=False) are not put into the adapter
    fresh = checkpointer(base, output_dir=str(tmp_path / "frozen"))
    frozen = fresh.load_checkpoint()[training.MODEL_KEY]
    path = fresh.save_checkpoint(
        {training.MODEL_KEY: frozen, training.ADAPTER_KEY: lora}, epoch=0, adapter_only=False
    )
    assert set(torch.load(path / "adapter_model.pt", weights_only=True)) == set(lora)
