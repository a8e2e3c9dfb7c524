"""DiT layout, initialisation, tables and validation against the reference's published definitions."""
import math

import pytest
import torch

from models import DiT, DiT_models, DiTArgs
from models.layers import timestep_embedding


def tiny(**kw):
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    args.update(kw)
    return DiT(**args)


def test_zero_initialised_model_outputs_zero():
    torch.manual_seed(0)
    model = tiny().eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 17, 999]), torch.tensor([0, 5, 9])
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8)
    assert torch.count_nonzero(out) == 0


def test_initialisation_follows_reference_recipe():
    torch.manual_seed(0)
    model = tiny(hidden_size=128)
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0
        assert torch.count_nonzero(block.adaLN_modulation[1].bias) == 0
        qkv = block.attn.qkv.weight  # xavier uniform bound sqrt(6 / (fan_in + fan_out))
        assert qkv.abs().max() <= math.sqrt(6 / (128 + 384)) + 1e-7
        assert qkv.abs().max() > 0.9 * math.sqrt(6 / (128 + 384))
        assert torch.count_nonzero(block.attn.qkv.bias) == 0 and torch.count_nonzero(block.mlp.fc1.bias) == 0
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    assert torch.count_nonzero(model.final_layer.adaLN_modulation[1].weight) == 0
    proj = model.x_embedder.proj.weight  # xavier on the flattened (D, C*p*p) matrix
    assert proj.abs().max() <= math.sqrt(6 / (128 + 16)) + 1e-7
    assert torch.count_nonzero(model.x_embedder.proj.bias) == 0
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.003
    assert abs(model.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.002
    assert not model.pos_embed.requires_grad


def test_pos_embed_entries_match_sincos_formula():
    d, grid = 64, 4
    model = tiny(hidden_size=d)
    table = model.pos_embed[0]  # (16, 64)
    assert table.shape == (grid * grid, d)
    quarter = d // 4
    for token in (0, 1, 6, 15):
        row, col = divmod(token, grid)
        for i in (0, 3, quarter - 1):
            omega = 1.0 / 10000 ** (i / quarter)
            # first half of the channels encodes the column, second half the row (reference meshgrid order)
            assert table[token, i].item() == pytest.approx(math.sin(col * omega), abs=1e-6)
            assert table[token, quarter + i].item() == pytest.approx(math.cos(col * omega), abs=1e-6)
            assert table[token, 2 * quarter + i].item() == pytest.approx(math.sin(row * omega), abs=1e-6)
            assert table[token, 3 * quarter + i].item() == pytest.approx(math.cos(row * omega), abs=1e-6)


def test_timestep_embedding_matches_formula():
    t = torch.tensor([0.0, 1.0, 37.0, 999.0])
    emb = timestep_embedding(t, 256)
    assert emb.dtype == torch.float32 and emb.shape == (4, 256)
    for n, tv in enumerate(t.tolist()):
        for i in (0, 1, 64, 127):
            freq = math.exp(-math.log(10000) * i / 128)
            assert emb[n, i].item() == pytest.approx(math.cos(tv * freq), abs=1e-4)
            assert emb[n, 128 + i].item() == pytest.approx(math.sin(tv * freq), abs=1e-4)
    odd = timestep_embedding(t, 7)
    assert odd.shape == (4, 7) and torch.all(odd[:, -1] == 0)


def official_xl2_shapes(depth=28, d=1152, classes=1000, p=2, c=4, tokens=256):
    shapes = {
        "pos_embed": (1, tokens, d),
        "x_embedder.proj.weight": (d, c, p, p), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
        "final_layer.linear.weight": (p * p * 2 * c, d), "final_layer.linear.bias": (p * p * 2 * c,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
            b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        })
    return shapes


def test_dit_xl2_state_dict_is_the_official_layout():
    with torch.device("meta"):
        model = DiTArgs.from_preset("DiT-XL/2", input_size=32).build()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_xl2_shapes()
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    assert sum(math.prod(s) for s in official_xl2_shapes().values()) == 675_129_632


@pytest.mark.parametrize("name,depth,hidden,heads,patch", [
    ("DiT-S/2", 12, 384, 6, 2), ("DiT-S/8", 12, 384, 6, 8), ("DiT-B/4", 12, 768, 12, 4),
    ("DiT-L/2", 24, 1024, 16, 2), ("DiT-XL/8", 28, 1152, 16, 8),
])
def test_model_zoo_sizes(name, depth, hidden, heads, patch):
    with torch.device("meta"):
        model = DiTArgs.from_preset(name).build()
    assert (len(model.blocks), model.hidden_size, model.num_heads, model.patch_size) == (depth, hidden, heads, patch)
    assert len(DiT_models) == 12


def test_flops_match_the_paper():
    with torch.device("meta"):
        small = DiTArgs.from_preset("DiT-S/2", input_size=32).build()
        xl = DiTArgs.from_preset("DiT-XL/2", input_size=32).build()
    # paper: 6.06 and 118.6 GMACs at 256 px; 2 FLOPs per multiply-add
    assert small.flops_per_sample(train=False) / 1e9 == pytest.approx(12.12, rel=0.01)
    assert xl.flops_per_sample(train=False) / 1e9 == pytest.approx(237.2, rel=0.01)
    assert xl.flops_per_sample(train=True) == 3 * xl.flops_per_sample(train=False)
    # hand count of one DiT-S/2 block at T=256, D=384: qkv + proj + mlp + attention + adaLN
    t, d = 256, 384
    block = 2 * t * d * 3 * d + 2 * t * d * d + 2 * 2 * t * d * 4 * d + 4 * t * t * d + 2 * d * 6 * d
    rest = 2 * t * 16 * d + 2 * (256 * d + d * d) + 2 * t * d * 32 + 2 * d * 2 * d
    assert small.flops_per_sample(train=False) == 12 * block + rest
    # the same model on a 16x16 latent grid (64 tokens)
    assert small.flops_per_sample(train=False, input_size=16) < small.flops_per_sample(train=False) / 3.5


def test_label_dropout_force_and_random():
    model = tiny(class_dropout_prob=0.5)
    labels = torch.tensor([1, 2, 3, 4])
    forced = model.y_embedder(labels, train=False, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    table = model.y_embedder.embedding_table.weight
    assert torch.equal(forced[0], table[10]) and torch.equal(forced[1], table[2]) and torch.equal(forced[2], table[10])
    torch.manual_seed(1)
    drops = torch.rand(4) < 0.5
    assert drops.any() and not drops.all()
    torch.manual_seed(1)
    random = model.y_embedder(labels, train=True)  # torch.rand against class_dropout_prob, like the reference
    expected = table[torch.where(drops, 10, labels)]
    assert torch.equal(random, expected)
    assert torch.equal(model.y_embedder(labels, train=False), table[labels])


def test_forward_force_drop_ids_equals_null_labels():
    torch.manual_seed(0)
    model = tiny().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p)) if p.requires_grad else None
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 400])
    y = torch.tensor([1, 2])
    dropped = model(x, t, y, force_drop_ids=torch.tensor([1, 0]))
    manual = model(x, t, torch.tensor([10, 2]))
    assert torch.equal(dropped, manual)


def test_forward_with_cfg_channels():
    torch.manual_seed(0)
    model = tiny().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "pos_embed":
                p.normal_(0, 0.1)
    x = torch.randn(2, 4, 8, 8).repeat(2, 1, 1, 1)
    t = torch.tensor([50, 50, 50, 50])
    y = torch.tensor([3, 7, 10, 10])
    with torch.no_grad():
        out = model(x, t, y)
        all_channels = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
        three = model.forward_with_cfg(x, t, y, cfg_scale=4.0, cfg_channels=3)
    guided = out[2:, :4] + 4.0 * (out[:2, :4] - out[2:, :4])
    assert torch.allclose(all_channels[:2, :4], guided, atol=1e-6)
    assert torch.allclose(all_channels[2:, :4], guided, atol=1e-6)
    assert torch.equal(all_channels[:, 4:], out[:, 4:])
    assert torch.allclose(three[:2, :3], guided[:, :3], atol=1e-6)
    assert torch.equal(three[:, 3:], out[:, 3:])  # reference: channel 3 and sigma unguided
    with pytest.raises(ValueError, match="9"):
        model.forward_with_cfg(x, t, y, 4.0, cfg_channels=9)
    with pytest.raises(ValueError, match="3"):
        model.forward_with_cfg(x[:3], t[:3], y[:3], 4.0)


def test_patch_embed_equals_strided_convolution():
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(2, 4, 8, 8)
    conv = torch.nn.functional.conv2d(x, model.x_embedder.proj.weight, model.x_embedder.proj.bias, stride=2)
    assert torch.allclose(model.x_embedder(x), conv.flatten(2).transpose(1, 2), atol=1e-5)


def test_unpatchify_inverts_patchify_layout():
    model = tiny(learn_sigma=False)
    img = torch.randn(2, 4, 8, 6)
    p = 2
    tokens = img.reshape(2, 4, 4, p, 3, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 12, p * p * 4)  # (N, T, p*p*C)
    assert torch.equal(model.unpatchify(tokens, (4, 3)), img)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(hidden_size=66, num_heads=4), "66"),
    (dict(input_size=9), "9"),
    (dict(grad_checkpoint=-1), "-1"),
    (dict(grad_checkpoint="all"), "all"),
    (dict(moe={"num_experts": 4, "top_k": 5}), "5"),
    (dict(moe={"num_experts": 0}), "0"),
    (dict(moe={"experts": 4}), "experts"),
    (dict(moe="yes"), "yes"),
    (dict(class_dropout_prob=1.5), "1.5"),
    (dict(ffn="relu"), "relu"),
    (dict(norm="batchnorm"), "batchnorm"),
    (dict(qk_norm="l2"), "l2"),
    (dict(depth=0), "depth"),
])
def test_constructor_rejects_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        tiny(**kwargs)


def test_unknown_model_name_lists_known_names():
    with pytest.raises(ValueError, match="DiT-XXL/2.*DiT-S/2"):
        DiTArgs.from_preset("DiT-XXL/2").build()


def test_bad_runtime_arguments():
    model = tiny()
    with pytest.raises(ValueError, match="-2"):
        model.set_grad_checkpointing(-2)
    with pytest.raises(ValueError, match="7"):
        model.set_input_size(7)
    with pytest.raises(ValueError, match="9"):
        model(torch.randn(1, 4, 9, 8), torch.tensor([1]), torch.tensor([1]))


def test_optional_layers_change_layout_only_when_enabled():
    base = set(tiny().state_dict())
    qk = tiny(qk_norm="rmsnorm")
    assert set(qk.state_dict()) - base == {f"blocks.{i}.attn.{n}.weight" for i in range(2) for n in ("q_norm", "k_norm")}
    swiglu = tiny(ffn="swiglu", mlp_ratio=4.0)
    assert swiglu.blocks[0].mlp.fc1.out_features == 168  # 2/3 * 4 * 64 = 170.7 -> multiple of 8
    assert set(tiny(norm="rmsnorm").state_dict()) == base
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([1, 2])
    for model in (qk, swiglu, tiny(norm="rmsnorm"), tiny(qk_norm="layernorm", ffn="swiglu", norm="rmsnorm")):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n != "pos_embed":
                    p.normal_(0, 0.1)
        out = model(x, t, y)
        assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()
        out.sum().backward()
