"""The pack index: packs read from it equal the in-memory packing token by token, it is
computed once and reused, and the sampler over it gives torchdata's order and resumes exactly."""

import json
import shutil

import numpy as np
import pytest
import torch
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune.datasets import PackedDataset

from llama_mimi_tt import audio_token_dataset, llama_mimi_tokenizer
from llama_mimi_tt.atomic_files import temporary_path
from llama_mimi_tt.code_cache import remove_cache, write_code_cache
from llama_mimi_tt.data import SequenceBuilder, pack_frame_aligned, pad_pack, validation_mask
from llama_mimi_tt.pack_index import INDEX_FOLDER, META_FILE
from llama_mimi_tt.training import PermutationSampler


def utterances(n=300, seed=0):
    """Lengths from one frame to several samples' worth, texts of different lengths."""
    g = np.random.default_rng(seed)
    words = ["speech", "a", "llama mimi", "one more line of text"]
    utts = []
    for i in range(n):
        frames = int(g.choice([g.integers(1, 12), g.integers(12, 80), g.integers(80, 300)]))
        text = " ".join(words[: 1 + i % len(words)])
        codes = g.integers(0, 2048, (8, frames)).astype(np.uint16)
        utts.append({"id": f"utt{i:04d}", "codes": codes, "text": text})
    return utts


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    return write_code_cache(root / "codes", utterances(), num_quantizers=8, shard_size=41)


def reference_samples(tok, utts, task, long_utterances, split, val_fraction):
    """The samples as the in-memory dataset built them: utterances in cache order, the
    split's ids, each cut by SequenceBuilder."""
    b = SequenceBuilder(tok, task, tok.max_seq_len, long_utterances)
    ids = [u["id"] for u in utts]
    val = validation_mask(ids, val_fraction) if split != "all" else np.zeros(len(ids), bool)
    keep = val if split == "validation" else ~val
    samples = []
    for u, k in zip(utts, keep):
        if not k:
            continue
        codes = u["codes"][: b.q]
        text_ids = b.text_ids(u["text"]) if task == "tts" else []
        first, n = b.plan(np.array([codes.shape[1]]), np.array([1 + len(text_ids)]))
        for chunk in range(int(n[0])):
            samples.append(b.sample(codes, text_ids if chunk == 0 else [], chunk, int(first[0])))
    return samples


@pytest.mark.parametrize(
    "L, task, long_utterances, split",
    [
        (256, "a2a", "split", "train"),
        (1024, "a2a", "split", "validation"),
        (128, "tts", "split", "all"),
        (200, "tts", "truncate", "train"),
    ],
)
def test_indexed_packs_equal_in_memory_packing_token_by_token(
    cache, L, task, long_utterances, split
):
    tok = llama_mimi_tokenizer("builtin:byte", num_quantizers=4, max_seq_len=L)
    kw = dict(task=task, long_utterances=long_utterances, split=split, val_fraction=0.1)
    ref = reference_samples(tok, utterances(), task, long_utterances, split, 0.1)
    samples = audio_token_dataset(tok, str(cache), **kw)
    assert [samples[i] for i in range(len(samples))] == ref

    packs = audio_token_dataset(tok, str(cache), packed=True, **kw)
    header = tok.header_ids()
    ref_packs = [pad_pack(p, L, tok.pad_id) for p in pack_frame_aligned(ref, L, 4, header)]
    assert len(packs) == len(ref_packs) >= 5
    for i, r in enumerate(ref_packs):
        for k, v in packs[i].items():
            assert torch.equal(v, r[k]), (i, k)

    # whole samples only: torchtune's own PackedDataset over the same samples
    whole = audio_token_dataset(tok, str(cache), packed=True, split_across_pack=False, **kw)
    tt = PackedDataset(ref, max_seq_len=L, padding_idx=tok.pad_id, split_across_pack=False)
    assert len(whole) == len(tt)
    for i in range(len(tt)):
        for k, v in whole[i].items():
            assert torch.equal(v, tt[i][k]), (i, k)


def test_index_is_computed_once_per_cache_and_settings(cache, tmp_path, monkeypatch):
    from llama_mimi_tt import pack_index

    tok = llama_mimi_tokenizer("builtin:byte", num_quantizers=4, max_seq_len=512)
    first = audio_token_dataset(tok, str(cache), packed=True, val_fraction=0.1)
    folders = sorted((cache / INDEX_FOLDER).iterdir())
    meta = json.loads((first.samples.index_folder / META_FILE).read_text())
    assert meta["packs"] == len(first) and meta["samples"] == len(first.samples)

    def no_recompute(*args, **kwargs):
        raise AssertionError("the index was computed again")

    monkeypatch.setattr(pack_index, "compute_index", no_recompute)
    again = audio_token_dataset(tok, str(cache), packed=True, val_fraction=0.1)
    assert torch.equal(again[3]["tokens"], first[3]["tokens"])
    assert sorted((cache / INDEX_FOLDER).iterdir()) == folders
    monkeypatch.undo()

    # another setting is another index; a rebuilt cache is another index
    audio_token_dataset(tok, str(cache), packed=True, val_fraction=0.2)
    assert len(list((cache / INDEX_FOLDER).iterdir())) == len(folders) + 1
    other = write_code_cache(tmp_path / "other", utterances(20, seed=1), num_quantizers=8)
    a = audio_token_dataset(tok, str(other), packed=True)
    remove_cache(other)
    assert not (other / INDEX_FOLDER).exists(), "remove_cache removes the indexes with it"
    write_code_cache(other, utterances(30, seed=2), num_quantizers=8)
    b = audio_token_dataset(tok, str(other), packed=True)
    assert b.samples.index_folder != a.samples.index_folder and len(b.samples) > len(a.samples)


def test_a_killed_build_blocks_nothing_and_a_racing_builder_keeps_the_first_index(
    cache, tmp_path, monkeypatch
):
    """The builder of a key removes what a killed build of it left (it owns the key); when
    another process puts the finished index in place first, that one is kept and ours dropped."""
    from llama_mimi_tt import pack_index

    tok = llama_mimi_tokenizer("builtin:byte", num_quantizers=4, max_seq_len=384)
    first = audio_token_dataset(tok, str(cache), packed=True, split="all")
    folder, want = first.samples.index_folder, first[5]["tokens"].clone()
    theirs = tmp_path / "theirs"
    shutil.copytree(folder, theirs)
    (theirs / "marker").write_text("theirs")
    shutil.rmtree(folder)
    killed = temporary_path(folder, writer="node3-77-dead")
    killed.mkdir()
    (killed / "row.bin").write_bytes(b"half an array")
    real = pack_index.compute_index

    def raced(rows, builder, settings, tmp, **kwargs):
        index = real(rows, builder, settings, tmp, **kwargs)
        assert not killed.exists()  # removed before this build started
        shutil.copytree(theirs, folder)  # another process renamed its index in first
        return index

    monkeypatch.setattr(pack_index, "compute_index", raced)
    again = audio_token_dataset(tok, str(cache), packed=True, split="all")
    assert (folder / "marker").read_text() == "theirs"
    assert not [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name]
    assert torch.equal(again[5]["tokens"], want)


def test_loader_workers_read_the_same_packs(cache):
    tok = llama_mimi_tokenizer("builtin:byte", num_quantizers=4, max_seq_len=256)
    ds = audio_token_dataset(tok, str(cache), packed=True, split="all")
    in_process = [ds[i]["tokens"] for i in range(6)]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    for i, item in enumerate(loader):
        if i == 6:
            break
        assert torch.equal(item["tokens"], in_process[i])


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_permutation_sampler_is_torchdata_order_and_resumes(shuffle, drop_last):
    data = list(range(103))
    for world in (1, 3, 4):
        for rank in range(world):
            kw = dict(num_replicas=world, rank=rank, shuffle=shuffle, seed=5, drop_last=drop_last)
            ours, theirs = PermutationSampler(data, **kw), StatefulDistributedSampler(data, **kw)
            for epoch in (0, 1):
                ours.set_epoch(epoch)
                theirs.set_epoch(epoch)
                assert list(ours) == list(theirs) and len(ours) == len(theirs)
            ours.set_epoch(2)
            it = iter(ours)
            head = [next(it) for _ in range(7)]
            state = ours.state_dict()
            resumed = PermutationSampler(data, **kw)
            resumed.set_epoch(2)
            resumed.load_state_dict(state)
            assert head + list(resumed) == list(ours)


def test_permutation_sampler_order_on_a_large_corpus():
    """Its int32 permutation is torch's int64 one (what StatefulDistributedSampler draws)."""
    data = range(1_500_006)
    ours = PermutationSampler(data, num_replicas=3, rank=1, shuffle=True, seed=11)
    g = torch.Generator()
    g.manual_seed(11)
    assert list(ours) == torch.randperm(len(data), generator=g)[1::3].tolist()
