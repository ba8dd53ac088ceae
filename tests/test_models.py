"""Model shapes, parameter counts, squash, routing and margin loss."""

from __future__ import annotations

import pytest
import torch

from capsnet_core import build_model, count_parameters
from capsnet_core.models import CapsNet, CapsNetConfig, margin_loss, squash

TINY_CAPSNET = {"conv_channels": 16, "primary_maps": 4, "decoder_hidden": (32, 64)}


def test_parameter_counts_match_the_tutorial_and_the_paper() -> None:
    assert count_parameters(build_model("lenet5")) == 44_426
    assert count_parameters(build_model("capsnet")) == 8_215_568


def test_full_size_capsnet_shapes() -> None:
    model = build_model("capsnet")
    images = torch.rand(2, 1, 28, 28)
    out = model(images, torch.tensor([3, 7]), return_coupling=True)
    assert out.scores.shape == (2, 10)
    assert out.capsules.shape == (2, 10, 16)
    assert out.reconstructions.shape == (2, 1, 28, 28)
    assert out.coupling.shape == (2, 1152, 10)
    assert model.primary_capsules(images).shape == (2, 1152, 8)


def test_lenet5_shapes_and_layers() -> None:
    model = build_model("lenet5")
    out = model(torch.rand(5, 1, 28, 28))
    assert out.scores.shape == (5, 10)
    assert out.capsules is None and out.reconstructions is None
    assert [tuple(p.shape) for p in model.parameters()] == [
        (6, 1, 5, 5), (6,), (16, 6, 5, 5), (16,), (120, 256), (120,), (84, 120), (84,), (10, 84), (10,)]


def test_unknown_model_and_config_field_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg16'.*c8cnn, capsnet, effcaps, lenet5, resnet"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="unknown capsnet config field"):
        build_model("capsnet", widht=3)


def test_squash_lengths_in_unit_interval_and_direction_kept() -> None:
    s = torch.randn(1000, 16) * torch.logspace(-4, 2, 1000).unsqueeze(1)
    v = squash(s)
    lengths = v.norm(dim=-1)
    assert torch.all(lengths >= 0) and torch.all(lengths < 1)
    # Huge inputs saturate at 1 within float32 rounding and never exceed it.
    assert squash(torch.full((1, 16), 1e6)).norm().item() <= 1.0 + 1e-6
    cos = torch.nn.functional.cosine_similarity(v, s, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-4)
    # |v| = |s|^2 / (1 + |s|^2) for a vector of length 1: exactly 0.5.
    unit = torch.zeros(1, 16)
    unit[0, 0] = 1.0
    assert squash(unit).norm().item() == pytest.approx(0.5, abs=1e-6)


def test_squash_finite_value_and_gradient_at_zero() -> None:
    s = torch.zeros(3, 8, requires_grad=True)
    v = squash(s)
    v.sum().backward()
    assert torch.all(torch.isfinite(v)) and torch.all(v == 0)
    assert torch.all(torch.isfinite(s.grad))


def test_coupling_coefficients_sum_to_one_over_parents() -> None:
    # Larger transforms than the training init, so that agreement visibly moves the coupling.
    model = CapsNet(CapsNetConfig(**TINY_CAPSNET, transform_init_std=0.5))
    out = model(torch.rand(4, 1, 28, 28), return_coupling=True)
    sums = out.coupling.sum(dim=2)  # over the 10 parent capsules
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    # Routing moved away from uniform coupling (1/10) after 3 iterations.
    assert (out.coupling - 0.1).abs().max() > 1e-4


def test_routing_iterations_change_the_coupling() -> None:
    torch.manual_seed(0)
    one = CapsNet(CapsNetConfig(**TINY_CAPSNET, routing_iters=1))
    out = one(torch.rand(2, 1, 28, 28), return_coupling=True)
    assert torch.allclose(out.coupling, torch.full_like(out.coupling, 0.1))  # one iteration = uniform


def test_margin_loss_hand_computed() -> None:
    lengths = torch.tensor([[0.95, 0.05, 0.5], [0.2, 0.0, 1.0]])
    labels = torch.tensor([0, 1])
    # Sample 0: present class 0 at 0.95 >= 0.9 -> 0; absent 0.05 <= 0.1 -> 0; absent 0.5 -> 0.5*(0.4)^2 = 0.08
    # Sample 1: present class 1 at 0.0 -> 0.81; absent 0.2 -> 0.5*0.01 = 0.005; absent 1.0 -> 0.5*0.81 = 0.405
    expected = torch.tensor([0.08, 0.81 + 0.005 + 0.405])
    assert torch.allclose(margin_loss(lengths, labels), expected, atol=1e-6)


def test_capsnet_total_loss_is_margin_plus_scaled_reconstruction() -> None:
    torch.manual_seed(0)
    model = CapsNet(CapsNetConfig(**TINY_CAPSNET)).train()
    images, labels = torch.rand(3, 1, 28, 28), torch.tensor([1, 2, 3])
    out = model(images, labels)
    margin = margin_loss(out.scores, labels).mean()
    reconstruction = ((out.reconstructions - images) ** 2).flatten(1).sum(1).mean()
    assert model.loss(out, images, labels).item() == pytest.approx((margin + 0.0005 * reconstruction).item(), rel=1e-5)


def test_decoder_masks_true_label_in_training_and_longest_capsule_in_eval() -> None:
    torch.manual_seed(0)
    model = CapsNet(CapsNetConfig(**TINY_CAPSNET))
    images = torch.rand(2, 1, 28, 28)
    model.eval()
    out = model(images)
    predicted = out.scores.argmax(1)
    masked = out.capsules * torch.nn.functional.one_hot(predicted, 10).unsqueeze(-1)
    assert torch.allclose(model.decoder(masked.flatten(1)).view(-1, 1, 28, 28), out.reconstructions)
    model.train()
    wrong = (predicted + 1) % 10
    out_train = model(images, wrong)
    masked = out_train.capsules * torch.nn.functional.one_hot(wrong, 10).unsqueeze(-1)
    assert torch.allclose(model.decoder(masked.flatten(1)).view(-1, 1, 28, 28), out_train.reconstructions)


def test_decoder_can_be_switched_off() -> None:
    model = build_model("capsnet", **TINY_CAPSNET, decoder=False)
    out = model(torch.rand(2, 1, 28, 28), torch.tensor([0, 1]))
    assert out.reconstructions is None
    assert torch.isfinite(model.loss(out, torch.rand(2, 1, 28, 28), torch.tensor([0, 1])))


@pytest.mark.parametrize("batch, cin, cout", [(3, 4, 8), (4, 256, 256)])  # tiny, and the full-size primary conv
def test_fft_conv_matches_conv2d_forward_and_gradients(batch: int, cin: int, cout: int) -> None:
    from capsnet_core.models.fftconv import conv2d_fft, dft_matrices, fft_weight_layout

    torch.manual_seed(0)
    mats = {k: m.float() for k, m in dft_matrices(9, 2, 6).items()}
    x = torch.randn(batch, cin, 20, 20, requires_grad=True)
    weight = fft_weight_layout(0.05 * torch.randn(cout, cin, 9, 9)).requires_grad_()
    bias = torch.randn(cout, requires_grad=True)
    expected = torch.nn.functional.conv2d(x, weight, bias, stride=2)  # (B, Cout, 6, 6)
    position_major = x.permute(2, 3, 0, 1)[:19, :19].contiguous()  # (19, 19, B, Cin)
    got = conv2d_fft(position_major, weight, bias, mats, 6).view(6, 6, batch, cout).permute(2, 3, 0, 1)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    grad_out = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad(expected, (x, weight, bias), grad_out),
                    torch.autograd.grad(got, (x, weight, bias), grad_out), strict=True):
        assert torch.allclose(b, a, rtol=0, atol=1e-5 * a.abs().max().item())


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_fft_and_direct_primary_conv_give_the_same_model(size: str) -> None:
    overrides = TINY_CAPSNET if size == "tiny" else {}
    torch.manual_seed(0)
    fft = CapsNet(CapsNetConfig(**overrides, primary_conv="fft", transform_init_std=0.1))
    direct = CapsNet(CapsNetConfig(**overrides, primary_conv="direct", transform_init_std=0.1))
    direct.load_state_dict(fft.state_dict())  # checkpoints are interchangeable: same names and shapes
    images, labels = torch.rand(3, 1, 28, 28), torch.tensor([1, 5, 9])
    losses, grads = [], []
    for model in (fft, direct):
        out = model(images, labels, return_coupling=True)
        loss = model.loss(out, images, labels)
        losses.append((out.scores, out.coupling, loss))
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for a, b in zip(*losses, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-4 * a.abs().max().item())


def reference_digit_capsules(model: CapsNet, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook formulation (einsums in (B, N_in, C, D) layout, softmax over a last dim)."""
    u_hat = torch.einsum("icdk,bik->bicd", model.transforms, u)  # (B, 1152, 10, 16)
    logits = u_hat.new_zeros(u_hat.shape[:3])
    for iteration in range(model.config.routing_iters):
        coupling = logits.softmax(dim=2)
        last = iteration == model.config.routing_iters - 1
        v = squash(torch.einsum("bic,bicd->bcd", coupling, u_hat if last else u_hat.detach()))
        if not last:
            logits = logits + torch.einsum("bicd,bcd->bic", u_hat.detach(), v)
    return v, coupling


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_routing_matches_the_einsum_formulation(size: str) -> None:
    torch.manual_seed(0)
    model = CapsNet(CapsNetConfig(**(TINY_CAPSNET if size == "tiny" else {}), transform_init_std=0.1))
    images = torch.rand(19, 1, 28, 28)  # not a multiple of the routing chunk
    out = model(images, return_coupling=True)
    v, coupling = reference_digit_capsules(model, model.primary_capsules(images))
    assert torch.allclose(out.capsules, v, rtol=1e-4, atol=1e-6)
    assert torch.allclose(out.coupling, coupling, rtol=1e-4, atol=1e-6)
    params = [model.transforms, model.primary.weight, model.conv1.weight]
    weights = torch.randn_like(v)  # a loss that touches every capsule component
    got = torch.autograd.grad((out.capsules * weights).sum(), params)
    expected = torch.autograd.grad((v * weights).sum(), params)
    for a, b in zip(expected, got, strict=True):
        assert torch.allclose(b, a, rtol=0, atol=1e-4 * a.abs().max().item())


def test_keep_freed_memory_stops_big_allocations_from_page_faulting() -> None:
    import resource

    from capsnet_core.models.fftconv import keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("needs glibc")
    torch.empty(2**24).fill_(1.0)  # 64 MB, allocated and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(2**24).fill_(1.0)  # reuses the freed heap memory
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 2_000  # a fresh mmap of 64 MB would page-fault 16,384 times (4 KB pages)


def test_effcaps_initialises_as_the_official_keras_model() -> None:
    import math

    model = build_model("effcaps", width=64)
    norms = [m for m in model.features if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 4 and all((m.momentum, m.eps) == (0.1, 1e-3) for m in norms)  # Keras's eps, torch's momentum
    conv = model.features[3]  # 64 -> 128 channels, 3x3: fan-in 576
    weight = conv.weight.detach().flatten()
    assert weight.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.05)        # he_normal's std
    limit = 2 * math.sqrt(2 / 576) / 0.87962566103423978
    assert weight.abs().max().item() <= limit + 1e-6                                  # truncated at 2 std
    assert all(float(m.bias.abs().max()) == 0.0 for m in (*model.features, model.primary)
               if isinstance(m, torch.nn.Conv2d))
