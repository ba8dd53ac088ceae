"""Dynamic-routing CapsNet after Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules" (2017).

conv1 (256 @ 9x9, ReLU) -> primary capsules (32 maps of 8-D capsules from one 9x9 stride-2
convolution: 32*6*6 = 1,152 capsules) -> digit capsules (10 x 16-D, one 8x16 transform per
(input, parent) pair, 3 routing iterations) -> class score = capsule length.
A decoder (160 -> 512 -> 1024 -> 784, sigmoid) reconstructs the image from the masked
digit capsules and regularises training.

Routing is vectorised over inputs and parents; Python loops only over the routing iterations
and over chunks of 8 samples (cache locality). On CPU the primary convolution runs through small
DFTs (fftconv.py, ~5x fewer FLOPs); the maths, parameters and checkpoints are the same either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ClassifierModel, ModelOutput
from .configs import CapsNetConfig, config_choices
from .fftconv import conv2d_fft, dft_matrices, fft_weight_layout, keep_freed_memory


def squash(s: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """v = |s|^2 / (1 + |s|^2) * s / |s|, written as s * |s| / (1 + |s|^2).

    The eps inside the square root keeps the value and its gradient finite at s = 0
    (the naive form divides by |s|). Output lengths stay in [0, 1).
    """
    squared_norm = (s * s).sum(dim=dim, keepdim=True)
    return s * torch.sqrt(squared_norm + eps) / (1.0 + squared_norm)


def margin_loss(lengths: torch.Tensor, labels: torch.Tensor, m_plus: float = 0.9, m_minus: float = 0.1,
                lambda_absent: float = 0.5) -> torch.Tensor:
    """Eq. 4: sum over classes of T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2.

    lengths: (B, C) capsule lengths; returns the per-sample loss, shape (B,).
    """
    present = F.one_hot(labels, lengths.shape[1]).to(lengths.dtype)  # (B, C)
    loss = present * F.relu(m_plus - lengths) ** 2 + lambda_absent * (1 - present) * F.relu(lengths - m_minus) ** 2
    return loss.sum(dim=1)


def reconstruction_decoder(capsule_floats: int, hidden: tuple[int, int]) -> nn.Sequential:
    """Section 4.1's decoder: the masked digit capsules (B, C*D) -> two ReLU layers -> (B, 784) in [0, 1]."""
    h1, h2 = hidden
    return nn.Sequential(
        nn.Linear(capsule_floats, h1), nn.ReLU(inplace=True),
        nn.Linear(h1, h2), nn.ReLU(inplace=True),
        nn.Linear(h2, 28 * 28), nn.Sigmoid(),
    )


def masked_reconstruction(decoder: nn.Module | None, v: torch.Tensor, lengths: torch.Tensor,
                          labels: torch.Tensor | None, training: bool) -> torch.Tensor | None:
    """Section 4.1: the decoder sees only one class's capsule, masked with the true label in
    training and with the longest capsule otherwise. v: (B, C, D); returns (B, 1, 28, 28) or None."""
    if decoder is None:
        return None
    target = labels if (labels is not None and training) else lengths.argmax(dim=1)
    mask = F.one_hot(target, v.shape[1]).to(v.dtype)  # (B, C)
    return decoder((v * mask.unsqueeze(-1)).flatten(1)).view(-1, 1, 28, 28)


def capsule_loss(output: ModelOutput, images: torch.Tensor, labels: torch.Tensor, config: object) -> torch.Tensor:
    """Margin loss plus the down-weighted reconstruction error (sum of squares per image), in fp32.
    ``config`` carries m_plus, m_minus, lambda_absent and reconstruction_weight."""
    c = config
    loss = margin_loss(output.scores.float(), labels, c.m_plus, c.m_minus, c.lambda_absent)  # (B,)
    if output.reconstructions is not None:
        squared_error = (output.reconstructions.float() - images.float()) ** 2
        loss = loss + c.reconstruction_weight * squared_error.flatten(1).sum(dim=1)
    return loss.mean()


ROUTING_CHUNK = 8  # samples routed together (see CapsNet.forward)


class CapsNet(ClassifierModel):
    name = "capsnet"

    def __init__(self, config: CapsNetConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or CapsNetConfig()
        self.conv1 = nn.Conv2d(1, c.conv_channels, 9)  # 28 -> 20
        # All primary capsules from one convolution: channel k*dim + d is component d of map k.
        self.primary = nn.Conv2d(c.conv_channels, c.primary_maps * c.primary_dim, 9, stride=2)  # 20 -> 6
        self.num_primary = c.primary_maps * 6 * 6
        # W[i, j] maps input capsule i (primary_dim) to its prediction for parent j (digit_dim).
        self.transforms = nn.Parameter(
            c.transform_init_std * torch.randn(self.num_primary, c.num_classes, c.digit_dim, c.primary_dim))
        self.decoder = reconstruction_decoder(c.num_classes * c.digit_dim, c.decoder_hidden) if c.decoder else None
        choices = config_choices(self.name, "primary_conv")
        if c.primary_conv not in choices:
            raise ValueError(f"primary_conv must be one of {', '.join(choices)}, not {c.primary_conv!r}")
        # DFT matrices of the FFT primary convolution; not in the state dict (they are constants).
        for key, mat in dft_matrices(9, 2, 6).items():
            self.register_buffer(f"_dft_{key}", mat.float(), persistent=False)
        if c.channels_last:
            self.conv1.to(memory_format=torch.channels_last)
        self._lay_out_primary_weight()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Every .to()/.cuda() (and Ray's prepare_model) ends here: once the parameters are on
        # their device, store the primary weight the way that device's convolution reads it.
        module = super()._apply(fn, recurse)
        self._lay_out_primary_weight()
        return module

    def _fft_on(self, device: torch.device) -> bool:
        mode = self.config.primary_conv
        return mode == "fft" or (mode == "auto" and device.type == "cpu")

    def _lay_out_primary_weight(self) -> None:
        """FFT path: (kh, kw, Cin, Cout) storage, which conv2d_fft reads without a copy. Direct
        path (cuDNN): channels_last or contiguous; the FFT layout there made cuDNN re-lay out
        the 5.3 M-element weight on every forward and copy its gradient back."""
        weight = self.primary.weight
        if self._fft_on(weight.device):
            wanted = fft_weight_layout(weight.data)
        else:
            wanted = weight.data.contiguous(
                memory_format=torch.channels_last if self.config.channels_last else torch.contiguous_format)
        if wanted.stride() != weight.stride():
            weight.data = wanted

    def use_fft(self, images: torch.Tensor) -> bool:
        # FFT on CPU, where the direct convolution is already at peak FLOP rate and only fewer
        # FLOPs help (fwd+bwd 0.29 s vs 0.78 s at batch 100 on 2 cores). On CUDA cuDNN with bf16 autocast is faster,
        # and the DFT matmuls must stay in fp32 (autocast would run them in bf16).
        return self._fft_on(images.device)

    def primary_capsules(self, images: torch.Tensor) -> torch.Tensor:
        """Squashed primary capsules u_i, (B, 1152, 8)."""
        return self.primary_capsules_input_major(images).transpose(0, 1)

    def primary_capsules_input_major(self, images: torch.Tensor) -> torch.Tensor:
        """The same, laid out (1152, B, 8): input capsule first, for the per-capsule u_hat bmm."""
        c = self.config
        b = images.shape[0]
        if self.use_fft(images):
            keep_freed_memory()  # its big temporaries would page-fault in every step (see there)
            # conv1 as an im2col matmul, position-major, only on the 19x19 outputs the stride-2
            # primary conv reads (its 20th row/column are never used).
            patches = F.unfold(images[:, :, :27, :27], 9).permute(2, 0, 1).reshape(361 * b, 81)
            x = torch.addmm(self.conv1.bias, patches, self.conv1.weight.reshape(c.conv_channels, 81).t())
            x = F.relu(x, inplace=True).view(19, 19, b, c.conv_channels)  # (H, W, B, 256)
            mats = {key: getattr(self, f"_dft_{key}") for key in ("x_width", "x_height", "w_width", "w_height",
                                                                  "inverse")}
            y = conv2d_fft(x, self.primary.weight, self.primary.bias, mats, 6)  # (36, B, maps*dim)
            u = y.view(36, b, c.primary_maps, c.primary_dim).permute(2, 0, 1, 3)  # (maps, 36, B, dim)
        else:
            if c.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            x = F.relu(self.conv1(images))  # (B, 256, 20, 20)
            x = self.primary(x)  # (B, maps*dim, 6, 6)
            u = x.reshape(b, c.primary_maps, c.primary_dim, 36).permute(1, 3, 0, 2)  # (maps, 36, B, dim)
        return squash(u.reshape(self.num_primary, b, c.primary_dim))  # capsule i = map * 36 + position

    def route(self, u_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing by agreement (Procedure 1). u_hat: (N_in, B, C, D) predictions.

        Returns parent capsules v (B, C, D) and the last coupling coefficients c (B, N_in, C).
        """
        n, b, nc, d = u_hat.shape
        # Both routing sums are batched over (sample, parent) pairs and reduce over the inputs:
        # bmm on a (B*C, N_in, D) view of u_hat, no copies.
        u_hat = u_hat.view(n, b * nc, d).transpose(0, 1)  # (B*C, N_in, D)
        # b_ij laid out (B, C, N_in): the softmax over the 10 parents then runs along a strided
        # dim with a long contiguous inner dim (fast), not along a last dim of size 10 (slow).
        # fp32 whatever u_hat's dtype: under bf16 autocast the agreements would otherwise be
        # summed over the iterations in bf16 (8 mantissa bits).
        logits = torch.zeros(b, nc, n, device=u_hat.device, dtype=torch.float32)
        # Intermediate iterations only decide the coupling coefficients; like the reference
        # implementations we do not backpropagate through them (cheaper, and more stable).
        u_hat_detached = u_hat.detach()
        for iteration in range(self.config.routing_iters):
            coupling = logits.softmax(dim=1)  # over parents, as in the paper
            last = iteration == self.config.routing_iters - 1
            u = u_hat if last else u_hat_detached
            s = torch.bmm(coupling.to(u.dtype).view(b * nc, 1, n), u).view(b, nc, d)  # sum_i c_ij u_hat_j|i
            v = squash(s)  # (B, C, D)
            if not last:
                agreement = torch.bmm(u_hat_detached, v.view(b * nc, d, 1))  # u_hat_j|i . v_j: (B*C, N_in, 1)
                logits = logits + agreement.view(b, nc, n).float()
        return v, coupling.transpose(1, 2)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                return_coupling: bool = False) -> ModelOutput:
        c = self.config
        u = self.primary_capsules_input_major(images)  # (1152, B, 8)
        # u_hat_j|i = W_ij u_i as one bmm over the inputs i: (B, 8) @ (8, C*D) each.
        w = self.transforms.view(self.num_primary, c.num_classes * c.digit_dim, c.primary_dim)
        u_hat = torch.bmm(u, w.transpose(1, 2)).view(self.num_primary, -1, c.num_classes, c.digit_dim)
        # On CPU, route a few samples at a time: u_hat is 1152 x 160 floats per sample and routing
        # reads it 5 times, so a chunk's part (~5 MB) stays in the L3 cache. On a GPU one chunk:
        # many small chunks would only add kernel launches.
        chunk = ROUTING_CHUNK if u_hat.device.type == "cpu" else u_hat.shape[1]
        vs, couplings = [], []
        for u_hat_chunk in u_hat.split(chunk, dim=1):
            v, coupling = self.route(u_hat_chunk)  # (b, 10, 16), (b, 1152, 10)
            vs.append(v)
            couplings.append(coupling)
        v, coupling = torch.cat(vs), torch.cat(couplings)
        lengths = v.norm(dim=-1)  # (B, 10)
        reconstructions = masked_reconstruction(self.decoder, v, lengths, labels, self.training)  # (B, 1, 28, 28)
        return ModelOutput(scores=lengths, capsules=v, reconstructions=reconstructions,
                           coupling=coupling if return_coupling else None)

    def loss(self, output: ModelOutput, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return capsule_loss(output, images, labels, self.config)
