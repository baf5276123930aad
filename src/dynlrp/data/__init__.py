"""Data that ships with dynlrp: a small CNN trained on scikit-learn's digits, for the demo.

The weights (``digits_cnn.pt``, a few tens of kB) are made by ``scripts/train_demo_cnn.py``
from scikit-learn's bundled 8x8 digits dataset; the file also holds one held-out example of
each digit, so the demo needs neither scikit-learn nor a download.

>>> model, samples, labels = load_digits_cnn()
>>> model(samples).argmax(1)          # samples: (10, 1, 8, 8) in [0, 1]
"""

from __future__ import annotations

from importlib import resources

import torch
from torch import nn

DIGITS_CNN_FILE = "digits_cnn.pt"


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits with a functional residual add.

    Input: ``(B, 1, 8, 8)`` grey values in ``[0, 1]`` (scikit-learn's digits divided by 16,
    bright strokes on a dark background). Output: ``(B, 10)`` class logits.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = torch.relu(h + self.conv3(h))  # residual add
        return self.fc(self.pool(h).flatten(1))


def load_digits_cnn() -> tuple[DigitsCNN, torch.Tensor, torch.Tensor]:
    """Load the shipped digits CNN (in eval mode) and its held-out samples.

    Returns
    -------
    model : DigitsCNN
        The trained network, in eval mode.
    samples : torch.Tensor
        ``(10, 1, 8, 8)``: one held-out example of each digit, values in ``[0, 1]``.
    labels : torch.Tensor
        ``(10,)``: their true classes.
    """
    with resources.as_file(resources.files(__name__) / DIGITS_CNN_FILE) as path:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitsCNN()
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob["samples"], blob["labels"]


def digits_cnn_info() -> dict[str, str]:
    """Training metadata stored with the weights (test accuracy, seed, trainer script)."""
    with resources.as_file(resources.files(__name__) / DIGITS_CNN_FILE) as path:
        return dict(torch.load(path, map_location="cpu", weights_only=True)["meta"])
