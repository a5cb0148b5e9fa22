"""The models of the presets: a LeNet-like CNN and a configurable MLP."""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def lenet(num_classes: int = 10) -> nn.Sequential:
    """Conv(1→16, 3x3) → MaxPool(2) → ReLU → Conv(16→32, 4x4) → MaxPool(2) → ReLU →
    Linear(800→1024) → ReLU → Linear(1024→10): 838,858 parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3),  # 28 → 26
        nn.MaxPool2d(2),  # → 13
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=4),  # → 10
        nn.MaxPool2d(2),  # → 5
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 5 * 5, 1024),
        nn.ReLU(),
        nn.Linear(1024, num_classes),
    )


def mlp(hidden: list[int], activation: str = "relu", output_activation: str = "", num_classes: int = 10) -> nn.Sequential:
    """784 → hidden... → num_classes, `activation` after every hidden layer and,
    if given, `output_activation` after the last one."""
    for name in (activation, output_activation):
        if name and name not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{name}' (choose from {', '.join(ACTIVATIONS)})")
    sizes = [28 * 28, *hidden, num_classes]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        last = i == len(sizes) - 2
        if not last:
            layers.append(ACTIVATIONS[activation]())
        elif output_activation:
            layers.append(ACTIVATIONS[output_activation]())
    return nn.Sequential(*layers)


def build_model(config) -> nn.Sequential:
    if config.model == "lenet":
        return lenet()
    if config.model == "mlp":
        return mlp(config.hidden, config.activation, config.output_activation)
    raise ValueError(f"unknown model '{config.model}' (choose lenet or mlp)")


def first_layer_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Weights worth looking at as images: both conv layers of the CNN, the first Linear of an MLP."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if convs:
        return [(f"conv{i + 1}", conv.weight.detach()) for i, conv in enumerate(convs[:2])]
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    return [("layer1", first.weight.detach().reshape(-1, 1, 28, 28))]


def parameter_checksum(model: nn.Module) -> str:
    """SHA-256 over every tensor of the state dict, in order: equal only for bitwise-equal weights."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
