"""The MLP model zoo: the name grammar, B-MLP / S-MLP modules, and their parameter, FLOP and memory counts.

Names: `B_<depth>-Wi_<width>` is the inverted-bottleneck MLP (paper Sec. 3): a linear
embedding of the flattened image, `depth` pre-norm residual blocks
`x + W_c act(W_e norm(x))` with expansion k, and a linear head.
`S_<depth>-Wi_<width>` is the standard MLP: the embedding, `depth` blocks
`W act(norm(x))` of width -> width, and the head. As in the paper's code there is
no norm between the last block and the head (`final_norm=True` adds one); this is
what reproduces the paper's parameter counts (Table 3, Table 7).

Counting (paper Eq. 4): `forward_flops` is the number of multiply-accumulates of
the Linear layers in one forward pass of one image, one MAC = one FLOP; biases,
norms and activations are not counted. Training compute C = 3 * forward_flops * N * T.
Every count here is analytic, so planning a grid never instantiates a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from mlpscale.errors import MlpscaleError
from mlpscale.model_choices import ACTIVATIONS, NORMALIZATIONS

ARCH_GRAMMAR = "B_<depth>-Wi_<width> (inverted bottleneck) or S_<depth>-Wi_<width> (standard), e.g. B_6-Wi_1024"
OPTIMIZER_STATE_BUFFERS = {"lion": 1, "sgd": 1, "adamw": 2, "adam": 2}
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "auto": 2}
FFCV_DEVICE_SLOTS = 5  # an FFCV epoch's memory slots: batches_ahead (3, mlpscale's loaders keep the default) + 2

_ARCH_PATTERN = re.compile(r"^(?P<kind>[BS])_(?P<depth>\d+)-Wi_(?P<width>\d+)$")


@dataclass(frozen=True)
class ArchSpec:
    """A parsed architecture name."""

    kind: str  # 'B' (inverted bottleneck) or 'S' (standard)
    depth: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.depth}-Wi_{self.width}"


def parse_arch(name: str | ArchSpec) -> ArchSpec:
    """Turn `B_6-Wi_1024` / `S_6-Wi_2048` into an ArchSpec; anything else raises MlpscaleError."""
    if isinstance(name, ArchSpec):
        return name
    match = _ARCH_PATTERN.match(str(name).strip())
    if not match:
        raise MlpscaleError(f"unknown architecture {name!r}: expected {ARCH_GRAMMAR}")
    spec = ArchSpec(match["kind"], int(match["depth"]), int(match["width"]))
    if spec.depth < 1 or spec.width < 1:
        raise MlpscaleError(f"architecture {name!r} needs depth >= 1 and width >= 1: expected {ARCH_GRAMMAR}")
    return spec


def _check_choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise MlpscaleError(f"{option}={value!r} is not supported: choose one of {', '.join(allowed)}")
    return value


def _check_positive(option: str, value: int) -> int:
    if int(value) != value or value < 1:
        raise MlpscaleError(f"{option}={value!r} must be a positive integer")
    return int(value)


def _make_norm(normalization: str, width: int) -> nn.Module:
    if normalization == "layer":
        return nn.LayerNorm(width)
    if normalization == "batch":
        return nn.BatchNorm1d(width)
    return nn.Identity()


def _make_activation(activation: str) -> nn.Module:
    return nn.GELU() if activation == "gelu" else nn.ReLU()


class BottleneckBlock(nn.Module):
    """x + W_c drop(act(W_e norm(x))), W_e: width -> k*width, W_c: k*width -> width."""

    def __init__(self, width: int, expansion: int, activation: str, normalization: str, dropout: float):
        super().__init__()
        self.norm = _make_norm(normalization, width)
        self.expand = nn.Linear(width, expansion * width)
        self.act = _make_activation(activation)
        self.drop1 = nn.Dropout(dropout)
        self.collapse = nn.Linear(expansion * width, width)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop2(self.collapse(self.drop1(self.act(self.expand(self.norm(x))))))


class StandardBlock(nn.Module):
    """W drop(act(norm(x))), W: width -> width (the paper's code order: norm, activation, linear)."""

    def __init__(self, width: int, activation: str, normalization: str, dropout: float):
        super().__init__()
        self.norm = _make_norm(normalization, width)
        self.act = _make_activation(activation)
        self.drop = nn.Dropout(dropout)
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(self.act(self.norm(x))))


class MLP(nn.Module):
    """Flatten -> embed -> blocks -> norm -> head. Inputs are normalised float images (B, C, R, R)."""

    def __init__(
        self,
        spec: ArchSpec,
        *,
        resolution: int,
        num_classes: int,
        in_channels: int = 3,
        expansion: int = 4,
        activation: str = "gelu",
        normalization: str = "layer",
        dropout: float = 0.0,
        final_norm: bool = False,
    ):
        super().__init__()
        self.spec = spec
        self.config = dict(
            arch=spec.name,
            resolution=resolution,
            num_classes=num_classes,
            in_channels=in_channels,
            expansion=expansion,
            activation=activation,
            normalization=normalization,
            dropout=dropout,
            final_norm=final_norm,
        )
        self.in_features = in_channels * resolution * resolution
        self.embed = nn.Linear(self.in_features, spec.width)
        if spec.kind == "B":
            blocks = [
                BottleneckBlock(spec.width, expansion, activation, normalization, dropout) for _ in range(spec.depth)
            ]
        else:
            blocks = [StandardBlock(spec.width, activation, normalization, dropout) for _ in range(spec.depth)]
        self.blocks = nn.Sequential(*blocks)
        self.norm = _make_norm(normalization, spec.width) if final_norm else nn.Identity()
        self.head = nn.Linear(spec.width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the head: the (B, width) representation a linear probe reads."""
        if x[0].numel() != self.in_features:
            raise MlpscaleError(
                f"{self.spec.name} expects images of {self.in_features} values "
                f"({self.config['in_channels']}x{self.config['resolution']}x{self.config['resolution']}), "
                f"got shape {tuple(x.shape[1:])}: build the model for the loader's resolution"
            )
        return self.norm(self.blocks(self.embed(x.flatten(1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def reset_head(self, num_classes: int) -> None:
        """Replace the head by a fresh Linear(width, num_classes) (for fine-tuning on a new task)."""
        self.head = nn.Linear(self.spec.width, num_classes).to(self.embed.weight.device)
        self.config["num_classes"] = num_classes


def build_model(
    arch: str | ArchSpec,
    *,
    resolution: int,
    num_classes: int,
    in_channels: int = 3,
    expansion: int = 4,
    activation: str = "gelu",
    normalization: str = "layer",
    dropout: float = 0.0,
    final_norm: bool = False,
) -> MLP:
    """The one registry: an architecture name plus options -> an MLP module (PyTorch default init)."""
    spec = parse_arch(arch)
    _check_positive("resolution", resolution)
    _check_positive("num_classes", num_classes)
    _check_positive("in_channels", in_channels)
    _check_positive("expansion", expansion)
    _check_choice("activation", activation, ACTIVATIONS)
    _check_choice("normalization", normalization, NORMALIZATIONS)
    if not 0.0 <= float(dropout) < 1.0:
        raise MlpscaleError(f"dropout={dropout!r} must lie in [0, 1)")
    return MLP(
        spec,
        resolution=resolution,
        num_classes=num_classes,
        in_channels=in_channels,
        expansion=expansion,
        activation=activation,
        normalization=normalization,
        dropout=float(dropout),
        final_norm=final_norm,
    )


def _linear_shapes(spec: ArchSpec, in_features: int, num_classes: int, expansion: int) -> list[tuple[int, int]]:
    """(in, out) of every Linear in forward order; each runs once per image."""
    shapes = [(in_features, spec.width)]
    for _ in range(spec.depth):
        if spec.kind == "B":
            shapes += [(spec.width, expansion * spec.width), (expansion * spec.width, spec.width)]
        else:
            shapes.append((spec.width, spec.width))
    shapes.append((spec.width, num_classes))
    return shapes


def _norm_params(normalization: str, width: int) -> int:
    # LayerNorm and BatchNorm1d both learn a scale and a shift (BatchNorm's running stats are buffers).
    return 0 if normalization == "none" else 2 * width


def model_stats(
    arch: str | ArchSpec,
    *,
    resolution: int,
    num_classes: int,
    in_channels: int = 3,
    expansion: int = 4,
    normalization: str = "layer",
    final_norm: bool = False,
) -> dict:
    """Analytic counts: num_params (trainable), forward_flops (Linear MACs per image), and the shape."""
    spec = parse_arch(arch)
    _check_positive("resolution", resolution)
    _check_positive("num_classes", num_classes)
    _check_positive("expansion", expansion)
    _check_choice("normalization", normalization, NORMALIZATIONS)
    shapes = _linear_shapes(spec, in_channels * resolution * resolution, num_classes, expansion)
    num_norms = spec.depth + (1 if final_norm else 0)
    num_params = sum(i * o + o for i, o in shapes) + num_norms * _norm_params(normalization, spec.width)
    return dict(
        arch=spec.name,
        kind=spec.kind,
        depth=spec.depth,
        width=spec.width,
        expansion=expansion if spec.kind == "B" else 1,
        num_params=num_params,
        forward_flops=sum(i * o for i, o in shapes),
    )


def count_params(model: nn.Module) -> int:
    """Trainable parameters of an instantiated model."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def training_compute(forward_flops: int, n_train: int, epochs: int | float) -> int:
    """Paper Eq. 4: C = 3 * forward_flops * N * T (the backward counted as twice the forward)."""
    return int(round(3 * int(forward_flops) * int(n_train) * float(epochs)))


def _kept_activation_bytes_per_example(
    spec: ArchSpec,
    in_features: int,
    num_classes: int,
    expansion: int,
    normalization: str,
    final_norm: bool,
    value_bytes: int,
) -> int:
    """Bytes per example that autograd keeps for the backward pass: the inputs of Linears, norms and
    activations, and the loss's log-probabilities (dropout masks are not counted). Under bf16 autocast
    (value_bytes 2) Linears and activations keep bf16 inputs, while CUDA runs norms in fp32 (their
    inputs kept at 4 bytes) and the loss runs on fp32 logits."""
    width, hidden = spec.width, expansion * spec.width
    norm_bytes = 4 if value_bytes == 2 else value_bytes
    norm = width * norm_bytes if normalization != "none" else 0
    if spec.kind == "B":
        # norm input, Linear W_e input (norm output), activation input, Linear W_c input
        per_block = norm + (width + hidden + hidden) * value_bytes
    else:
        per_block = norm + (width + width) * value_bytes
    final = norm if final_norm else 0
    return (in_features + width) * value_bytes + spec.depth * per_block + final + 4 * num_classes


def estimate_training_memory(
    arch: str | ArchSpec,
    *,
    resolution: int,
    num_classes: int,
    batch_size: int,
    optimizer: str = "lion",
    precision: str = "fp32",
    in_channels: int = 3,
    expansion: int = 4,
    normalization: str = "layer",
    final_norm: bool = False,
) -> dict:
    """Peak training memory estimate in bytes.

    weights, gradients: fp32 (autocast keeps fp32 master weights); optimizer_state: lion/sgd one
    buffer per weight, adam/adamw two; autocast_weights: the bf16 copies autocast makes of every
    Linear weight (0 in fp32); activations: what autograd keeps for the backward per example
    x batch size ('auto' is planned as the GPU's bf16); batch_and_logits: the normalised fp32 batch
    (under bf16 not itself kept by autograd) and the logits the loop keeps for its accuracy;
    loader_slots: the uint8 images FFCV keeps on a GPU (its batches_ahead 3 + 2 slots).
    CUDA context, allocator slack and kernel workspaces are not included.
    """
    spec = parse_arch(arch)
    _check_positive("batch_size", batch_size)
    _check_choice("optimizer", optimizer, tuple(OPTIMIZER_STATE_BUFFERS))
    _check_choice("precision", precision, tuple(PRECISION_BYTES))
    stats = model_stats(
        spec,
        resolution=resolution,
        num_classes=num_classes,
        in_channels=in_channels,
        expansion=expansion,
        normalization=normalization,
        final_norm=final_norm,
    )
    weights = 4 * stats["num_params"]
    value_bytes = PRECISION_BYTES[precision]
    in_features = in_channels * resolution * resolution
    per_example = _kept_activation_bytes_per_example(
        spec, in_features, num_classes, expansion, normalization, final_norm, value_bytes
    )
    memory = dict(
        weights=weights,
        gradients=weights,
        optimizer_state=OPTIMIZER_STATE_BUFFERS[optimizer] * weights,
        # Linear weight elements == forward MACs per image, since each Linear runs once per image.
        autocast_weights=0 if value_bytes == 4 else value_bytes * stats["forward_flops"],
        activations=per_example * batch_size,
        batch_and_logits=((4 * in_features if value_bytes == 2 else 0) + value_bytes * num_classes) * batch_size,
        loader_slots=FFCV_DEVICE_SLOTS * in_features * batch_size,
    )
    memory["total"] = sum(memory.values())
    return memory


def model_info(
    arch: str | ArchSpec,
    *,
    resolution: int,
    num_classes: int,
    in_channels: int = 3,
    expansion: int = 4,
    normalization: str = "layer",
    final_norm: bool = False,
    n_train: int | None = None,
    epochs: float | None = None,
    batch_size: int | None = None,
    optimizer: str = "lion",
    precision: str = "bf16",
) -> dict:
    """What a researcher plans a grid with (jobs/model_info.py): the stats, plus compute_flops when
    N and T are given and the memory estimate (bytes, and total_gib) when a batch size is given."""
    shape = dict(
        resolution=resolution,
        num_classes=num_classes,
        in_channels=in_channels,
        expansion=expansion,
        normalization=normalization,
        final_norm=final_norm,
    )
    info = model_stats(arch, **shape)
    info["params"] = info.pop("num_params")
    info.update(resolution=resolution, num_classes=num_classes, in_channels=in_channels)
    if (n_train is None) != (epochs is None):
        raise MlpscaleError("compute_flops needs both --n-train and --epochs: give both or neither")
    if n_train is not None:
        _check_positive("n_train", n_train)
        if epochs <= 0:
            raise MlpscaleError(f"epochs={epochs!r} must be positive")
        epochs = int(epochs) if float(epochs).is_integer() else float(epochs)
        info.update(
            n_train=n_train, epochs=epochs, compute_flops=training_compute(info["forward_flops"], n_train, epochs)
        )
    if batch_size is not None:
        memory = estimate_training_memory(
            arch, batch_size=batch_size, optimizer=optimizer, precision=precision, **shape
        )
        memory["total_gib"] = round(memory["total"] / 2**30, 3)
        info["memory"] = dict(batch_size=batch_size, optimizer=optimizer, precision=precision, **memory)
    return info
