"""The batching benchmark's model: an architecture registered as a user would register their own
(QUADRA_ARCHITECTURE_MODULES=bench.wide_model), whose forward pass dominates a request.

Wide layers make one row cost what reading the weights costs (a few milliseconds on one
thread), while more rows cost little more: what dynamic batching is for. It takes the Iris
rows and names the Iris classes, so every server in the phase answers the same requests."""

from __future__ import annotations

from typing import Any

from torch import nn

from utils.serving import register_architecture

ARCHITECTURE = "bench-wide"
CONFIG = {"architecture": ARCHITECTURE, "input_dim": 4, "num_classes": 3, "width": 1536, "depth": 4,
          "class_names": ["setosa", "versicolor", "virginica"]}


@register_architecture(ARCHITECTURE)
def build_wide(config: dict[str, Any]) -> nn.Module:
    width, depth = int(config["width"]), int(config["depth"])
    layers: list[nn.Module] = [nn.Linear(int(config["input_dim"]), width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, int(config["num_classes"])))
    return nn.Sequential(*layers)
