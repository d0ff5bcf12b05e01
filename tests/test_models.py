"""LoRA / QLoRA builders: the audio rows train, every text row and base weight stays frozen, and
the merged export loads in transformers with the LoRA model's logits. Sizes on the meta device."""

import pytest
import torch
import torch.nn.functional as F
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune import training
from torchtune.modules.peft import (
    get_adapter_params,
    get_adapter_state_dict,
    get_merged_lora_ckpt,
    set_trainable_params,
    validate_missing_and_unexpected_for_lora,
)

from llama_mimi_tt import (
    LlamaMimiCheckpointer,
    MimiVocab,
    audio_rows_state_dict,
    llama_mimi_tiny,
    lora_llama_mimi_tiny,
    model_sizes,
    qlora_llama_mimi_1b,
)
from llama_mimi_tt.modules import ExtendedEmbedding
from tests.hf_fixtures import hf_logits, make_tiny_hf_llama

T, Q = 512, 4
VOCAB = MimiVocab(text_vocab_size=T, num_quantizers=Q)
LORA = dict(
    lora_attn_modules=["q_proj", "v_proj", "output_proj"],
    apply_lora_to_mlp=True,
    lora_rank=4,
    lora_alpha=8.0,
)


def batch(seed=0, n=2, frames=8):
    """<|begin_of_text|> text <audio> random audio ids ..., with next-token labels."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 256, (n, 4), generator=g)
    audio = VOCAB.encode(torch.randint(0, 2048, (n, Q, frames), generator=g))
    start = torch.full((n, 1), VOCAB.audio_start_id)
    return torch.cat([torch.full((n, 1), 256), text, start, audio], dim=1)


def lora_setup(tmp_path, tie=True, **kwargs):
    """As torchtune's LoRA recipe: build, mark adapters trainable, load the base checkpoint
    (through our checkpointer, audio rows added) with strict=False, validate."""
    src = make_tiny_hf_llama(tmp_path / "base", tie=tie, seed=5)
    ckpt = LlamaMimiCheckpointer(
        str(src),
        ["model.safetensors"],
        "LLAMA3_2",
        str(tmp_path / "out"),
        num_quantizers=Q,
        text_vocab_size=T,
    )
    args = dict(LORA, tie_word_embeddings=tie, **kwargs)
    model = lora_llama_mimi_tiny(**args)
    set_trainable_params(model, get_adapter_params(model))
    missing, unexpected = model.load_state_dict(ckpt.load_checkpoint()["model"], strict=False)
    validate_missing_and_unexpected_for_lora(
        args["lora_attn_modules"],
        args["apply_lora_to_mlp"],
        args.get("apply_lora_to_output", False),
        base_missing=missing,
        base_unexpected=unexpected,
    )
    return ckpt, model, args


def train_steps(model, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for i in range(steps):
        ids = batch(i)
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_extended_embedding_equals_plain_embedding_and_grads_audio_rows_only():
    emb = ExtendedEmbedding(T, VOCAB.size - T, 16)
    ids = torch.tensor([[0, T - 1, T, VOCAB.size - 1, 7, T + 3]])
    ref = F.embedding(ids, emb.weight)
    out = emb(ids)
    assert torch.equal(out, ref)
    out.sum().backward()
    assert emb.text_weight.grad is None and not emb.text_weight.requires_grad
    g = emb.audio_weight.grad
    assert set(g.abs().sum(1).nonzero().flatten().tolist()) == {0, 3, VOCAB.size - 1 - T}
    sd = emb.state_dict()
    assert list(sd) == ["weight"] and torch.equal(sd["weight"], emb.weight)
    other = ExtendedEmbedding(T, VOCAB.size - T, 16)
    other.load_state_dict(sd)
    assert torch.equal(other.weight, emb.weight)
    with pytest.raises(RuntimeError, match="check num_quantizers"):
        other.load_state_dict({"weight": torch.zeros(T + 10, 16)})


@pytest.mark.parametrize("tie", [True, False])
def test_lora_trains_audio_rows_and_lora_only_and_exports_merged(tmp_path, tie):
    # untied: LoRA on the output projection too (8B layout), beside its trainable audio rows
    ckpt, model, args = lora_setup(tmp_path, tie=tie, apply_lora_to_output=not tie)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(get_adapter_params(model))
    audio = {"tok_embeddings.audio_weight"} | (set() if tie else {"output.audio_weight"})
    assert audio <= trainable
    assert all(".lora_" in n for n in trainable - audio)
    n_lora = 4 * (3 + 3) * 2 + (0 if tie else 2)  # layers * (q, v, o, w1, w2, w3) * (a, b)
    assert len(trainable - audio) == n_lora

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = train_steps(model)
    # Adam state exists for the trainable parameters only, at their shapes
    state = {id(p): s for p, s in opt.state.items()}
    for n, p in model.named_parameters():
        assert (id(p) in state) == (n in trainable)
    assert state[id(model.tok_embeddings.audio_weight)]["exp_avg"].shape == (VOCAB.size - T, 128)
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:  # text rows and base weights: bit for bit
            assert torch.equal(p, before[n]), f"{n} changed"

    # the recipe's save: adapter state dict + merged state dict, through our checkpointer
    model.eval()
    ids = batch(10)
    with torch.no_grad():
        lora_logits = model(ids)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert "tok_embeddings.weight" in sd and not any("text_weight" in k for k in sd)
    # the training recipe puts the trained audio rows into the adapter dict, explicitly
    rows = audio_rows_state_dict(model)
    assert set(rows) == audio
    adapter = {**get_adapter_state_dict(sd), **rows}
    merged = get_merged_lora_ckpt(sd, rank=args["lora_rank"], alpha=args["lora_alpha"])
    out = ckpt.save_checkpoint(
        {
            training.MODEL_KEY: merged,
            training.ADAPTER_KEY: adapter,
            training.ADAPTER_CONFIG: {
                "r": 4,
                "lora_alpha": 8.0,
                "target_modules": ["q_proj"],
                "peft_type": "LORA",
            },
        },
        epoch=0,
    )
    assert out == tmp_path / "out" / "epoch_0"
    d = (hf_logits(out, ids) - lora_logits).abs().max().item()
    print(
        f"\n[tie={tie}] merged LoRA export vs LoRA model, transformers logits: max abs diff {d:.2e}"
    )
    assert d <= 1e-4

    # the adapter checkpoint holds the trained audio rows: base + adapter = the LoRA model
    saved = torch.load(out / "adapter_model.pt", weights_only=True)
    for k, v in rows.items():
        assert torch.equal(saved[k], v)
    base = LlamaMimiCheckpointer(str(tmp_path / "base"), num_quantizers=Q, text_vocab_size=T)
    resumed = lora_llama_mimi_tiny(**args).eval()
    resumed.load_state_dict(base.load_checkpoint()[training.MODEL_KEY], strict=False)
    _, unexpected = resumed.load_state_dict(saved, strict=False)
    assert not unexpected
    with torch.no_grad():
        torch.testing.assert_close(resumed(ids), lora_logits, rtol=0, atol=0 if tie else 1e-5)


def test_train_audio_rows_false_keeps_the_embedding_frozen(tmp_path):
    _, model, _ = lora_setup(tmp_path, train_audio_rows=False)
    assert isinstance(model.tok_embeddings, torch.nn.Embedding)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    emb = model.tok_embeddings.weight.detach().clone()
    train_steps(model, steps=2)
    assert torch.equal(model.tok_embeddings.weight, emb)


def test_plain_state_dict_moves_between_full_and_lora_models():
    full = llama_mimi_tiny(Q, T).eval()
    lora = lora_llama_mimi_tiny(**LORA).eval()
    missing, unexpected = lora.load_state_dict(full.state_dict(), strict=False)
    assert not unexpected and all(".lora_" in k for k in missing)
    ids = batch(3)
    with torch.no_grad():
        assert (lora(ids) - full(ids)).abs().max() <= 1e-5  # lora_b = 0 at init


def test_qlora_1b_on_meta_quantizes_base_and_trains_audio_rows():
    with torch.device("meta"), training.set_default_dtype(torch.bfloat16):
        model = qlora_llama_mimi_1b(**LORA)
    layer = model.layers[0]
    for w in (layer.attn.q_proj.weight, layer.attn.k_proj.weight, layer.mlp.w2.weight):
        assert isinstance(w, NF4Tensor)
    adapters = get_adapter_params(model)
    assert "tok_embeddings.audio_weight" in adapters and len(adapters) == 1 + 16 * 6 * 2
    assert model.tok_embeddings.audio_weight.shape == (8194, 2048)
    assert model.tok_embeddings.audio_weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiple of 16384 elements"):
        lora_llama_mimi_tiny(**LORA, quantize_base=True)


def test_lora_builder_arguments():
    with pytest.raises(ValueError, match="tied embeddings"):
        lora_llama_mimi_tiny(**LORA, apply_lora_to_output=True)
    m = lora_llama_mimi_tiny(**LORA, pad_vocab_to_multiple_of=64, num_quantizers=8)
    assert m.tok_embeddings.num_embeddings == MimiVocab(T, 8).padded_size(64)


def test_model_sizes_on_meta_device():
    full = model_sizes("1b", "full")
    # Llama-3.2-1B (1,235,814,400 parameters) + the 8194 audio rows of width 2048
    assert full["params"] == full["trainable"] == 1_235_814_400 + 8194 * 2048
    assert full["weight_bytes"] == 2 * full["params"]
    lora = model_sizes("1b", "lora")
    qlora = model_sizes("1b", "qlora")
    assert lora["trainable"] > lora["audio_rows"] == 8194 * 2048
    assert qlora["trainable"] == lora["trainable"]
    assert qlora["weight_bytes"] < 0.5 * lora["weight_bytes"]
    frozen = model_sizes("1b", "lora", train_audio_rows=False)
    assert frozen["trainable"] == lora["trainable"] - lora["audio_rows"]


def test_audio_rows_under_fsdp2(tmp_path):
    """torchtune's FSDP2 LoRA path (meta init, shard, full-state-dict load and gather) keeps the
    plain keys and the unsharded logits. One gloo process here (DTensor parameters, hooks and
    collectives all run); 2 processes were checked by hand with torchrun."""
    from functools import partial

    import torch.distributed as dist
    from torchtune.modules.peft import LoRALinear

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for tie in (True, False):
            torch.manual_seed(0)
            base_sd = llama_mimi_tiny(tie_word_embeddings=tie).state_dict()
            ref = lora_llama_mimi_tiny(**LORA, tie_word_embeddings=tie)
            ref.load_state_dict(base_sd, strict=False)
            with torch.device("meta"):
                model = lora_llama_mimi_tiny(**LORA, tie_word_embeddings=tie)
            set_trainable_params(model, get_adapter_params(model))
            names = None if tie else ["tok_embeddings", "output"]  # tied: stays with the root
            training.shard_model(
                model=model,
                shard_conditions=[partial(training.get_shard_conditions, names_to_match=names)],
                cpu_offload=False,
                reshard_after_forward=True,
            )
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    m.to_empty(device="cpu")
                if hasattr(m, "rope_init"):
                    m.rope_init()
            cpu = torch.device("cpu")
            missing, unexpected = training.load_from_full_model_state_dict(model, base_sd, cpu)
            assert not unexpected and all(".lora_" in k for k in missing)
            lora_sd = {k: v for k, v in ref.state_dict().items() if ".lora_" in k}
            training.load_from_full_model_state_dict(model, lora_sd, cpu)
            assert hasattr(model.tok_embeddings.audio_weight, "device_mesh")  # a DTensor
            ids = batch(4)
            out = model(ids)
            assert (out - ref(ids)).abs().max() < 1e-5
            out.sum().backward()
            assert model.tok_embeddings.audio_weight.grad is not None
            assert model.tok_embeddings.text_weight.grad is None
            full = training.gather_cpu_state_dict(model, True, device=cpu)
            assert torch.equal(full["tok_embeddings.weight"], base_sd["tok_embeddings.weight"])
            assert ("output.weight" in full) == (not tie)
    finally:
        dist.destroy_process_group()
