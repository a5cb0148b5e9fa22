"""The models of the presets: a LeNet-like CNN and a configurable MLP."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def lenet(num_classes: int = 10, batch_norm: bool = False) -> nn.Sequential:
    """Conv(1→16, 3x3) → MaxPool(2) → ReLU → Conv(16→32, 4x4) → MaxPool(2) → ReLU →
    Linear(800→1024) → ReLU → Linear(1024→10): 838,858 parameters.

    `batch_norm`: BatchNorm after each conv and after the hidden Linear (before the
    pooling and the ReLU; 2,144 more parameters), which lets a far larger learning rate
    train: the `fast` preset reaches 99.1% on average in one epoch with it."""
    norm = (lambda kind, n: [kind(n)]) if batch_norm else (lambda kind, n: [])
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3),  # 28 → 26
        *norm(nn.BatchNorm2d, 16),
        nn.MaxPool2d(2),  # → 13
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=4),  # → 10
        *norm(nn.BatchNorm2d, 32),
        nn.MaxPool2d(2),  # → 5
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 5 * 5, 1024),
        *norm(nn.BatchNorm1d, 1024),
        nn.ReLU(),
        nn.Linear(1024, num_classes),
    )


def activation_layer(name: str, leaky_slope: float) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}' (choose from {', '.join(ACTIVATIONS)})")
    return nn.LeakyReLU(leaky_slope) if name == "leaky_relu" else ACTIVATIONS[name]()


def mlp(
    hidden: list[int], activation: str = "relu", output_activation: str = "", num_classes: int = 10, leaky_slope: float = 0.01
) -> nn.Sequential:
    """784 → hidden... → num_classes, `activation` after every hidden layer and,
    if given, `output_activation` after the last one."""
    sizes = [28 * 28, *hidden, num_classes]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        last = i == len(sizes) - 2
        if not last:
            layers.append(activation_layer(activation, leaky_slope))
        elif output_activation:
            layers.append(activation_layer(output_activation, leaky_slope))
    return nn.Sequential(*layers)


@torch.no_grad()
def fan_product_normal_(model: nn.Module) -> nn.Module:
    """mathspp's initialisation (nn.py, `create_weight_matrix`): each weight tensor drawn from
    N(0, std 1/(fan_out x fan_in)), i.e. one over its number of entries, and each bias vector
    (a fan_out x 1 matrix there) from N(0, std 1/fan_out). Far smaller than PyTorch's default
    (std ~1/sqrt(3 fan_in)), which is what lets raw 0..255 pixels train without diverging."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, 0.0, 1.0 / module.weight.numel())
            if module.bias is not None:
                nn.init.normal_(module.bias, 0.0, 1.0 / module.bias.numel())
    return model


def build_model(config) -> nn.Sequential:
    """The config's model, initialised from the current torch RNG state."""
    if config.model == "lenet":
        model = lenet(batch_norm=config.batch_norm)
    elif config.model == "mlp":
        model = mlp(config.hidden, config.activation, config.output_activation, leaky_slope=config.leaky_slope)
    else:
        raise ValueError(f"unknown model '{config.model}' (choose lenet or mlp)")
    return fan_product_normal_(model) if config.init == "fan_product_normal" else model


@contextlib.contextmanager
def values_restored(tensors: list[torch.Tensor]):
    """On exit, each tensor holds its value from entry again, in place (the same storage,
    which a captured CUDA graph may point at)."""
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, value in zip(tensors, saved):
                t.copy_(value)


def buffers_restored(model: nn.Module):
    """On exit, every buffer (BatchNorm's running statistics) holds its value from entry
    again, in place: warm-up passes on batches of zeros leave no trace in the model."""
    return values_restored(list(model.buffers()))


def first_layer_weights(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Weights worth looking at as images, from a model's state dict (in module order): both
    conv layers of the CNN, or an MLP's first Linear as one 28x28 tile per unit. [n, c, h, w] each.
    ValueError for a state dict of neither kind (a saved model can come from anywhere)."""
    convs = [t.detach() for t in state.values() if t.ndim == 4]
    if convs:
        return [(f"conv{i + 1}", w) for i, w in enumerate(convs[:2])]
    first = next((t.detach() for t in state.values() if t.ndim == 2), None)
    if first is None:
        raise ValueError("holds no 4-D (conv) or 2-D (linear) weight to draw")
    if first.shape[1] != 28 * 28:
        raise ValueError(f"its first 2-D weight is {first.shape[0]}x{first.shape[1]}; an MLP's first layer takes 784 (28x28) inputs")
    return [("layer1", first.reshape(-1, 1, 28, 28))]  # splits one dimension: a view, never a copy


def parameter_checksum(model: nn.Module) -> str:
    """SHA-256 over every tensor of the state dict, in order: equal only for bitwise-equal weights."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
