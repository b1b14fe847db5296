"""The digits task: a small ResNet on scikit-learn's handwritten digits.

The data is ``sklearn.datasets.load_digits`` (1797 8x8 grey images bundled with scikit-learn, so
nothing is downloaded), split (stratified, by the seed) into 1347 training and 450 test images.
The headline figure is the test accuracy; the check asks DropIT γ = 0.8 to stay within 1.5
points of the baseline over 3 seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .runner import Check, DemoConfig, Metric, Task, cosine_schedule


@dataclass
class DigitsConfig(DemoConfig):
    """The digits task's settings (``epochs``: passes over the training set, each then tested)."""

    gammas: tuple[float, ...] = (0.5, 0.8, 0.9)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    width: int = 32

    positive_ints = ("epochs", "seeds", "batch_size", "width")

    def validate(self) -> "DigitsConfig":
        super().validate()
        if self.batch_size > 1000:
            raise ValueError(f"batch_size must be at most 1000 (the training set has ~1350 images), got {self.batch_size}")
        return self


@dataclass
class Digits:
    """The digits split into train and test tensors, standardised with train statistics."""

    x_train: torch.Tensor  # (N, 1, 8, 8) float32
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, device: torch.device) -> "Digits":
        return Digits(*(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test)))


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> Digits:
    """scikit-learn's digits, split (stratified) by ``seed``; pixels standardised by the train set."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        list(range(len(y))), test_size=test_fraction, random_state=seed, stratify=data.target
    )
    idx_train, idx_test = torch.tensor(idx_train), torch.tensor(idx_test)
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    return Digits((x_train - mean) / std, y[idx_train], (x_test - mean) / std, y[idx_test])


def batch_orders(seed: int, n: int, epochs: int, batch_size: int) -> list[list[torch.Tensor]]:
    """Per epoch, the index batches of a seeded shuffle of ``n`` samples (last partial batch dropped)."""
    gen = torch.Generator().manual_seed(seed)
    orders = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        steps = n // batch_size
        orders.append([perm[i * batch_size : (i + 1) * batch_size] for i in range(steps)])
    return orders


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv-BN when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A small ResNet for 8x8 images: a 3x3 stem, two stages of residual blocks, a linear head.

    ``width`` channels at 8x8, ``2*width`` at 4x4; global average pooling; ``num_classes`` logits.
    """

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in percent."""
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return 100.0 * correct / len(y)


class DigitsTask(Task):
    """SGD with Nesterov momentum 0.9, weight decay and a cosine learning rate over all steps;
    the test set is evaluated after every epoch."""

    name = "digits"
    title = "DigitsResNet on sklearn digits"
    config_class = DigitsConfig
    metrics = (Metric("test_acc", "test acc %", 2, higher_is_better=True, plot_span=6.0),)
    check = Check(tolerance=1.5, relative=False)
    needs = ("sklearn",)

    def load(self, cfg: DigitsConfig, device: torch.device) -> Digits:
        return load_digits_split(cfg.seed).to(device)

    def describe(self, data: Digits, cfg: DigitsConfig) -> dict[str, Any]:
        train, test = len(data.y_train), len(data.y_test)
        return {"name": "sklearn digits", "train": train, "test": test,
                "log": f"{train} train / {test} test images, {cfg.epochs} epochs x "
                       f"{train // cfg.batch_size} steps of {cfg.batch_size}"}

    def build_model(self, cfg: DigitsConfig) -> nn.Module:
        return DigitsResNet(cfg.width)

    def schedule(self, data: Digits, cfg: DigitsConfig, seed: int) -> list[list[torch.Tensor]]:
        device = data.y_train.device
        orders = batch_orders(seed, len(data.y_train), cfg.epochs, cfg.batch_size)
        return [[idx.to(device) for idx in epoch] for epoch in orders]

    def optimizer(self, model: nn.Module, cfg: DigitsConfig, total_steps: int):
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay,
                              nesterov=True)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(total_steps))

    def inputs_and_targets(self, data: Digits, cfg: DigitsConfig, batch: torch.Tensor) -> tuple[tuple, torch.Tensor]:
        return (data.x_train[batch],), data.y_train[batch]

    def criterion(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, targets)

    def evaluate(self, model: nn.Module, data: Digits, cfg: DigitsConfig) -> dict[str, float]:
        return {"test_acc": accuracy(model, data.x_test, data.y_test)}
