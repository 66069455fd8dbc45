"""attention_processor: the [V*] capture is exact, decoder-only, differentiable and free when idle."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from peft import LoraConfig

import attention_processor as ap

LATENT = (32, 32)


@pytest.fixture
def unet(tiny_model_path):
    model = UNet2DConditionModel.from_pretrained(tiny_model_path, subfolder="unet")
    model.requires_grad_(False)
    return model


def unet_inputs(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 9, *LATENT, generator=generator)
    text = torch.randn(batch, 77, 32, generator=generator)
    return sample, torch.tensor([10, 500][:batch] * (batch // 2 or 1))[:batch], text


def one_hot_weights(batch, position, length=77):
    weights = torch.zeros(batch, length)
    weights[:, position] = 1
    return weights


def add_random_lora(unet):
    # init_lora_weights=False: B is random too, so the LoRA changes the outputs.
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))


@pytest.mark.parametrize("with_lora", [False, True])
def test_recording_output_equals_sdpa(unet, with_lora):
    if with_lora:
        add_random_lora(unet)
    sample, timesteps, text = unet_inputs()
    with torch.no_grad():
        reference = unet(sample, timesteps, text).sample
        store = ap.VStarAttentionStore()
        ap.install_vstar_capture(unet, store)
        with store.recording(one_hot_weights(2, 3), LATENT):
            recorded = unet(sample, timesteps, text).sample
            assert len(store.maps) == 6
        idle = unet(sample, timesteps, text).sample
    torch.testing.assert_close(recorded, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(idle, reference)


def test_recorded_map_equals_hand_computation(unet):
    name = "up_blocks.2.attentions.0.transformer_blocks.0.attn2"
    attn = dict(unet.named_modules())[name]
    store = ap.VStarAttentionStore()
    processor = ap.VStarCrossAttnProcessor(store, name, AttnProcessor2_0())
    generator = torch.Generator().manual_seed(0)
    channels = attn.to_q.in_features
    hidden = torch.randn(2, 16 * 16, channels, generator=generator)
    text = torch.randn(2, 77, 32, generator=generator)
    weights = torch.zeros(2, 77)
    weights[:, 4], weights[:, 5] = 0.5, 0.5  # a token split into two pieces: their average
    with torch.no_grad(), store.recording(weights, LATENT):
        processor(attn, hidden, text)
        recorded = store.maps[name]

        heads, dim = attn.heads, attn.to_q.out_features // attn.heads
        q = attn.to_q(hidden).view(2, -1, heads, dim).transpose(1, 2)
        k = attn.to_k(text).view(2, -1, heads, dim).transpose(1, 2)
        probabilities = torch.softmax(q @ k.transpose(-1, -2) / dim**0.5, dim=-1)
        expected = (0.5 * probabilities[..., 4] + 0.5 * probabilities[..., 5]).mean(dim=1).reshape(2, 1, 16, 16)
    torch.testing.assert_close(recorded, expected, rtol=1e-5, atol=1e-6)


def test_only_decoder_cross_attention_records(unet):
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    store = ap.VStarAttentionStore()
    names = ap.install_vstar_capture(unet, store)
    assert names and all(n.startswith("up_blocks.") and n.endswith(".attn2") for n in names)
    for name, processor in unet.attn_processors.items():
        module = name[: -len(".processor")]
        if module in names:
            assert isinstance(processor, ap.VStarCrossAttnProcessor)
        else:
            assert type(processor) is before[name]
    sample, timesteps, text = unet_inputs()
    with torch.no_grad(), store.recording(one_hot_weights(2, 1), LATENT):
        unet(sample, timesteps, text)
        assert sorted(store.maps) == sorted(names)
        # 3 decoder levels with cross-attention at 3 resolutions: 8x8, 16x16, 32x32 latent tokens.
        assert {tuple(m.shape[-2:]) for m in store.maps.values()} == {(8, 8), (16, 16), (32, 32)}
        assert store.aggregate().shape == (2, 1, *LATENT)


def test_records_only_the_chosen_rows(unet):
    store = ap.VStarAttentionStore()
    ap.install_vstar_capture(unet, store)
    sample, timesteps, text = unet_inputs(batch=4)
    with torch.no_grad(), store.recording(one_hot_weights(2, 2), LATENT, rows=slice(2, 4)):
        unet(sample, timesteps, text)
        assert store.aggregate().shape == (2, 1, *LATENT)
        full = store.aggregate()
    with torch.no_grad(), store.recording(one_hot_weights(4, 2), LATENT):
        unet(sample, timesteps, text)
        torch.testing.assert_close(store.aggregate()[2:], full)


def test_map_gradient_reaches_lora(unet):
    add_random_lora(unet)
    store = ap.VStarAttentionStore()
    ap.install_vstar_capture(unet, store)
    sample, timesteps, text = unet_inputs()
    with store.recording(one_hot_weights(2, 3), LATENT):
        unet(sample, timesteps, text)
        attention = store.aggregate()
        assert attention.requires_grad
        attention.square().mean().backward()
    decoder_lora = [p for n, p in unet.named_parameters() if "up_blocks" in n and "attn2.to_k.lora" in n]
    assert decoder_lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder_lora)


def test_no_recording_and_fast_path_when_idle(unet, monkeypatch):
    store = ap.VStarAttentionStore()
    ap.install_vstar_capture(unet, store)
    calls = []
    monkeypatch.setattr(ap.VStarCrossAttnProcessor, "recording_attention", lambda *a, **k: calls.append(1))
    sample, timesteps, text = unet_inputs()
    with torch.no_grad():
        unet(sample, timesteps, text)
    assert calls == [] and store.maps == {}
    with pytest.raises(RuntimeError, match="no \\[V\\*\\] attention map was recorded"):
        store.aggregate()


def test_gradient_checkpointing_records_once_and_backpropagates(unet):
    add_random_lora(unet)
    store = ap.VStarAttentionStore()
    ap.install_vstar_capture(unet, store)
    sample, timesteps, text = unet_inputs()
    with torch.no_grad():
        reference = unet(sample, timesteps, text).sample
    unet.enable_gradient_checkpointing()
    unet.train()
    store.start(one_hot_weights(2, 3), LATENT)
    output = unet(sample, timesteps, text).sample
    maps_before = dict(store.maps)
    loss = store.aggregate().square().mean() + output.square().mean()
    loss.backward()  # recomputes the checkpointed blocks while the store is still recording
    assert store.maps.keys() == maps_before.keys()
    assert all(store.maps[k] is maps_before[k] for k in maps_before)
    store.reset()
    torch.testing.assert_close(output.detach(), reference, rtol=1e-5, atol=1e-5)
    grads = [p.grad for n, p in unet.named_parameters() if "up_blocks" in n and "attn2.to_k.lora" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_install_and_remove_leave_the_unet_as_found(unet):
    before = dict(unet.attn_processors)
    store = ap.VStarAttentionStore()
    ap.install_vstar_capture(unet, store)
    ap.install_vstar_capture(unet, store)  # idempotent: wraps the original, not our own processor
    assert all(p.fallback is before[n] for n, p in unet.attn_processors.items() if isinstance(p, ap.VStarCrossAttnProcessor))
    ap.remove_vstar_capture(unet)
    assert all(unet.attn_processors[n] is p for n, p in before.items())


def test_token_weights_single_and_multi_piece():
    ids = torch.tensor([[49406, 7, 8, 9, 49407, 49407], [49406, 1, 7, 8, 9, 49407]])
    single = ap.token_weights(ids, [8])
    assert single[0].tolist() == [0, 0, 1, 0, 0, 0] and single[1].tolist() == [0, 0, 0, 1, 0, 0]
    multi = ap.token_weights(ids, [7, 8, 9])
    assert multi[0].tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3, 0, 0])
    with pytest.raises(ValueError, match="do not occur in prompt row"):
        ap.token_weights(ids, [8, 7])


def test_token_pieces_with_the_tiny_tokenizer(tiny_pipeline):
    tokenizer = tiny_pipeline.tokenizer
    assert len(ap.token_piece_ids(tokenizer, "sks")) == 1
    pieces = ap.token_piece_ids(tokenizer, "qzx")  # not in the tiny vocabulary: three letters
    assert len(pieces) == 3
    ids = tokenizer("A bottle with qzx", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ap.token_weights(ids, pieces).sum().item() == pytest.approx(1.0)


def test_layer_spatial_size():
    assert ap.layer_spatial_size(64 * 64, (64, 64)) == (64, 64)
    assert ap.layer_spatial_size(16 * 16, (64, 64)) == (16, 16)
    assert ap.layer_spatial_size(4 * 3, (25, 17)) == (4, 3)  # ceil halving: 25->13->7->4, 17->9->5->3
    with pytest.raises(ValueError):
        ap.layer_spatial_size(7, (64, 64))


def test_recording_under_bf16_keeps_fp32_maps(unet):
    unet.to(torch.bfloat16)
    store = ap.VStarAttentionStore()
    ap.install_vstar_capture(unet, store)
    sample, timesteps, text = unet_inputs()
    with torch.no_grad():
        reference = unet(sample.bfloat16(), timesteps, text.bfloat16()).sample
        with store.recording(one_hot_weights(2, 3), LATENT):
            output = unet(sample.bfloat16(), timesteps, text.bfloat16()).sample
            maps = store.aggregate()
    assert output.dtype == torch.bfloat16 and maps.dtype == torch.float32
    torch.testing.assert_close(output.float(), reference.float(), rtol=0.05, atol=0.05)
    # Probabilities of one token, averaged: inside [0, 1].
    assert 0 <= maps.min() and maps.max() <= 1
