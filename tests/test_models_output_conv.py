"""``model.output_conv``: zero-initialised 3×3 convolutions over the DiT's unpatchified output (models/layers.py).

Why it exists: each token writes its own p×p output patch, so a briefly trained DiT leaves seams on the token grid
(the embedded demo's samples measured 1.44 on the 16-pixel token lines, benchmarks/bench_demo_seams.py). The
option must (1) leave the reference DiT untouched when off and start as the same function when on, (2) really
connect neighbouring tokens' output patches, and no further than its kernels reach, (3) flow from the run config
into the checkpointed ``DiTArgs`` and back, refusing values it does not know, and (4) run the same under pipeline
parallelism, while exports to diffusers (which has no such layer) refuse.
"""
import copy
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
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_off_by_default_and_left_out_of_the_checkpoint_record():
    assert ARGS.output_conv == 0 and "output_conv" not in ARGS.to_dict()  # old checkpoints' JSON unchanged
    assert DiTArgs.from_dict(ARGS.to_dict()) == ARGS
    for layers in (1, 2):
        on = dataclasses.replace(ARGS, output_conv=layers)
        assert on.to_dict()["output_conv"] == layers and DiTArgs.from_dict(on.to_dict()) == on
    assert ARGS.build().output_conv is None
    for bad in (3, -1, 1.5):
        with pytest.raises(ValueError, match="output_conv must be 0"):
            dataclasses.replace(ARGS, output_conv=bad).build()


@pytest.mark.parametrize("layers,new_params,extra_flops", [
    (1, {"output_conv.0.weight", "output_conv.0.bias"}, 2 * 64 * 8 * 8 * 9),  # 8×8 output pixels, 8 → 8 channels
    (2, {"output_conv.0.weight", "output_conv.0.bias", "output_conv.2.weight", "output_conv.2.bias"},
     2 * 2 * 64 * 8 * 32 * 9),  # 8 → 32 → 8
])
def test_same_seed_gives_the_plain_dit_weights_and_function_at_init(layers, new_params, extra_flops):
    torch.manual_seed(0)
    plain = ARGS.build()
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    conv = dataclasses.replace(ARGS, output_conv=layers).build()
    after_conv = torch.rand(3)
    assert torch.equal(after_plain, after_conv)  # building it drew nothing from the global generator
    ps, cs = plain.state_dict(), conv.state_dict()
    assert set(cs) - set(ps) == new_params
    assert all(torch.equal(ps[k], cs[k]) for k in ps)
    last = f"output_conv.{2 * (layers - 1)}"
    assert not cs[f"{last}.weight"].any() and not cs[f"{last}.bias"].any()
    _randomise(plain)  # a trained-looking DiT: the zero-initialised block adds nothing to it
    conv.load_state_dict({**plain.state_dict(), **{k: cs[k] for k in new_params}})
    assert torch.equal(plain(*_inputs()), conv(*_inputs()))
    assert conv.flops_per_sample(train=False) == plain.flops_per_sample(train=False) + extra_flops


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_an_output_patch_sees_its_neighbouring_tokens_only_through_the_convs(layers):
    """Perturb token 0's final-layer output (output rows 0-1, columns 0-1): without the convs only its own 2×2
    patch changes; one 3×3 conv reaches one pixel across the border into tokens 1, 4 and 5, two reach two."""
    model = _randomise(dataclasses.replace(ARGS, output_conv=layers).build())
    x, t, y = _inputs()
    base = model(x, t, y).detach()

    def bump(module, args, out):
        out = out.clone()
        out[:, 0] += 1.0
        return out

    handle = model.final_layer.register_forward_hook(bump)
    changed = (model(x, t, y).detach() - base).abs().amax(dim=(0, 1)) > 1e-6  # (H, W)
    handle.remove()
    reach = 2 + layers  # rows/columns 0 .. reach-1 may change
    assert changed[:reach, :reach].all()
    assert not changed[:, reach:].any() and not changed[reach:, :].any()


def test_run_config_flows_into_the_architecture_and_bad_values_are_refused():
    from trainer.config.model import architecture
    from trainer.config.schema import ConfigError, load_config

    for value in (0, 1, 2):
        cfg = load_config("configs/tiny.yaml", [f"model.output_conv={value}"])
        assert architecture(cfg, in_channels=4, input_size=8, num_classes=5).output_conv == value
    cfg = load_config("configs/tiny.yaml", ["model.output_conv=3"])
    with pytest.raises(ConfigError, match="model.output_conv must be 0"):
        architecture(cfg, in_channels=4, input_size=8, num_classes=5)


def test_diffusers_export_refuses_with_the_option_named():
    from models.convert import diffusers_config

    with pytest.raises(ValueError, match="output_conv=1"):
        diffusers_config(dataclasses.replace(ARGS, output_conv=1).build().config)
    assert diffusers_config(ARGS.build().config)["num_layers"] == 2


@pytest.mark.parametrize("layers", [1, 2])
def test_pipeline_layers_compute_the_same_output_and_gradients(layers):
    from models.parallel.pipeline import BlockLayer, DiTSource, EmbedLayer, FinalLayer, pipeline_name_map

    model = _randomise(dataclasses.replace(ARGS, output_conv=layers).build())
    reference = copy.deepcopy(model)
    source = DiTSource(model)
    stages = [EmbedLayer(source)] + [BlockLayer(source, i) for i in range(ARGS.depth)] + [FinalLayer(source)]
    x, t, y = _inputs()
    inputs = (x, t, y, None)
    for stage in stages:
        inputs = stage(inputs)
    expected = reference(x, t, y)
    torch.testing.assert_close(inputs, expected, rtol=0, atol=0)
    inputs.square().mean().backward()
    expected.square().mean().backward()
    torch.testing.assert_close(stages[-1].output_conv[0].weight.grad, reference.output_conv[0].weight.grad)
    assert stages[-1].output_conv[-1].weight.grad.abs().sum() > 0
    names = [f"{ARGS.depth + 1}.{n}" for n, _ in stages[-1].named_parameters()]
    assert {"output_conv.0.weight", f"output_conv.{2 * (layers - 1)}.bias"} <= set(
        pipeline_name_map(names, ARGS.depth).values())
