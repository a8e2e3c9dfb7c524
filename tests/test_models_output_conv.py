"""``model.output_conv``: a zero-initialised 3×3 convolution over the DiT's unpatchified output (models/dit.py).

Why it exists: each token writes its own p×p output patch, so a briefly trained DiT leaves seams on the token grid
(the embedded demo's samples measured 1.44 on the 16-pixel token lines, benchmarks/bench_demo_seams.py). The
option must (1) leave the reference DiT untouched when off and start as the same function when on, (2) really
connect neighbouring tokens' output patches, (3) flow from the run config into the checkpointed ``DiTArgs`` and
back, and (4) run the same under pipeline parallelism, while exports to diffusers (which has no such layer) refuse.
"""
import dataclasses

import pytest
import torch

from models import DiTArgs

ARGS = DiTArgs(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=5,
               class_dropout_prob=0.0)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.tensor([1, 4])


def _randomise(model):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_off_by_default_and_left_out_of_the_checkpoint_record():
    assert ARGS.output_conv is False and "output_conv" not in ARGS.to_dict()  # old checkpoints' JSON unchanged
    assert DiTArgs.from_dict(ARGS.to_dict()) == ARGS
    on = dataclasses.replace(ARGS, output_conv=True)
    assert on.to_dict()["output_conv"] is True and DiTArgs.from_dict(on.to_dict()) == on
    assert ARGS.build().output_conv is None


def test_same_seed_gives_the_plain_dit_weights_and_function_at_init():
    torch.manual_seed(0)
    plain = ARGS.build()
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    conv = dataclasses.replace(ARGS, output_conv=True).build()
    after_conv = torch.rand(3)
    assert torch.equal(after_plain, after_conv)  # building it drew nothing from the global generator
    ps, cs = plain.state_dict(), conv.state_dict()
    assert set(cs) - set(ps) == {"output_conv.weight", "output_conv.bias"}
    assert all(torch.equal(ps[k], cs[k]) for k in ps)
    assert not cs["output_conv.weight"].any() and not cs["output_conv.bias"].any()
    _randomise(plain)  # a trained-looking DiT: the zero conv adds nothing to it
    conv.load_state_dict({**plain.state_dict(), "output_conv.weight": cs["output_conv.weight"],
                          "output_conv.bias": cs["output_conv.bias"]})
    assert torch.equal(plain(*_inputs()), conv(*_inputs()))
    extra = 2 * 16 * 2 ** 2 * 8 * 8 * 9  # 16 tokens × 2×2 pixels × 8→8 channels × 3×3
    assert conv.flops_per_sample(train=False) == plain.flops_per_sample(train=False) + extra


@pytest.mark.parametrize("output_conv", [False, True])
def test_an_output_patch_sees_its_neighbouring_token_only_through_the_conv(output_conv):
    """Perturb token 0's final-layer output: without the conv only its own 2×2 output patch changes; with it the
    pixels just across the border (token 1's patch) change too and nothing further away."""
    model = _randomise(dataclasses.replace(ARGS, output_conv=output_conv).build())
    x, t, y = _inputs()
    base = model(x, t, y).detach()

    def bump(module, args, out):
        out = out.clone()
        out[:, 0] += 1.0  # token 0 = output rows 0-1, columns 0-1
        return out

    handle = model.final_layer.register_forward_hook(bump)
    changed = (model(x, t, y).detach() - base).abs().amax(dim=(0, 1)) > 1e-6  # (H, W)
    handle.remove()
    assert changed[:2, :2].all()
    if output_conv:
        assert changed[:2, 2].all() and changed[2, :2].all()  # the neighbours' border pixels
        assert not changed[:, 3:].any() and not changed[3:, :].any()  # a 3×3 kernel reaches one pixel over
    else:
        assert changed.sum() == 4


def test_run_config_flows_into_the_architecture():
    from trainer.config.model import architecture
    from trainer.config.schema import load_config

    for value in (False, True):
        cfg = load_config("configs/tiny.yaml", [f"model.output_conv={str(value).lower()}"])
        assert architecture(cfg, in_channels=4, input_size=8, num_classes=5).output_conv is value


def test_diffusers_export_refuses_with_the_option_named():
    from models.convert import diffusers_config

    with pytest.raises(ValueError, match="output_conv=True"):
        diffusers_config(dataclasses.replace(ARGS, output_conv=True).build().config)
    assert diffusers_config(ARGS.build().config)["num_layers"] == 2


def test_pipeline_layers_compute_the_same_output_and_gradients():
    from models.parallel.pipeline import BlockLayer, DiTSource, EmbedLayer, FinalLayer, pipeline_name_map

    import copy

    model = _randomise(dataclasses.replace(ARGS, output_conv=True).build())
    reference = copy.deepcopy(model)
    source = DiTSource(model)
    layers = [EmbedLayer(source)] + [BlockLayer(source, i) for i in range(ARGS.depth)] + [FinalLayer(source)]
    x, t, y = _inputs()
    inputs = (x, t, y, None)
    for layer in layers:
        inputs = layer(inputs)
    expected = reference(x, t, y)
    torch.testing.assert_close(inputs, expected, rtol=0, atol=0)
    inputs.square().mean().backward()
    expected.square().mean().backward()
    torch.testing.assert_close(layers[-1].output_conv.weight.grad, reference.output_conv.weight.grad)
    assert layers[-1].output_conv.weight.grad.abs().sum() > 0
    names = [f"{ARGS.depth + 1}.{n}" for n, _ in layers[-1].named_parameters()]
    assert {"output_conv.weight", "output_conv.bias"} <= set(pipeline_name_map(names, ARGS.depth).values())
