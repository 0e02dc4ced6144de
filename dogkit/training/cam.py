"""Class activation maps in PyTorch: which networks have exact ones, and the export wrapper that returns them.

A network that ends in global average pooling and one linear layer computes ``logits[k] = mean(cams[k]) + b[k]``
with ``cams[k] = Σ_c W[k, c] · F[c]`` (Zhou et al., CVPR 2016), ``F`` the feature map that enters the pooling.
The map of every class is then one product with the head's own weights: the ONNX graph returns it as a second
output, ``cams`` (batch × classes × h × w), sharing the head's initializer, so the file grows by a few nodes and
the deploy core turns maps into pictures with numpy (``dogkit.deploy.explain``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..deploy.runtime import MAPS_OUTPUT
from .models import head_name

__all__ = ["MAPS_OUTPUT", "WithMaps", "maps_problem"]


# Where networks keep their global pooling: torchvision's ``avgpool``, timm's ``global_pool``.
POOLS = ("avgpool", "global_pool")


def is_global_average(pool: nn.Module | None) -> bool:
    """torch's AdaptiveAvgPool2d to 1 × 1, or timm's SelectAdaptivePool2d of an average kind (with or without
    its flatten): each takes the feature map whole and returns its spatial mean."""
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        return pool.output_size in (1, (1, 1))
    kind = getattr(pool, "pool_type", None)  # timm.layers.SelectAdaptivePool2d
    return isinstance(kind, str) and kind in ("avg", "fast", "fastavg")


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Linear] | str:
    """(the global pooling module, the linear head) of ``model.net``, or why it has no exact map."""
    net = getattr(model, "net", model)
    pool = next((getattr(net, name) for name in POOLS if isinstance(getattr(net, name, None), nn.Module)), None)
    if not is_global_average(pool):
        return (f"{type(net).__name__} does not end in a global average pooling module "
                f"({' or '.join(POOLS)})")
    try:
        head = net.get_submodule(head_name(net))
    except Exception:  # no Linear at all
        return f"{type(net).__name__} has no linear head"
    return pool, head


def maps_problem(model: nn.Module, size: int) -> str | None:
    """None when ``model``'s logits are exactly the pooled maps plus the head's bias (checked on one random
    image, so a head with anything between the pooling and the linear layer is caught); else why not."""
    parts = _parts(model)
    if isinstance(parts, str):
        return parts
    pool, head = parts
    seen: dict[str, torch.Tensor] = {}
    handle = pool.register_forward_pre_hook(lambda _m, args: seen.__setitem__("f", args[0]))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            x = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
            logits = model(x).float()
            features = seen.get("f")
            if features is None or features.ndim != 4 or features.shape[1] != head.in_features:
                return (f"the input of {type(pool).__name__} does not feed the head "
                        f"{head_name(getattr(model, 'net', model))}")
            pooled = torch.einsum("nchw,kc->nk", features.float(), head.weight.float()) / features[0, 0].numel()
            rebuilt = pooled + head.bias.float()
    finally:
        handle.remove()
        model.train(was_training)
    if not torch.allclose(rebuilt, logits, rtol=1e-3, atol=1e-3 * float(logits.abs().max()) + 1e-5):
        return "its head is not one linear layer straight after global average pooling"
    return None


class WithMaps(nn.Module):
    """uint8 RGB NHWC images → (logits, cams): the classifier and every class's activation map."""

    def __init__(self, model: nn.Module):
        super().__init__()
        parts = _parts(model)
        if isinstance(parts, str):
            raise ValueError(parts)
        self.model = model
        self.pool, self.head = parts

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, the feature map that enters the global pooling) of uint8 NHWC images."""
        seen: list[torch.Tensor] = []
        # The hook lives for one call only, so the network is left as it was found.
        handle = self.pool.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:  # contiguous(): see models.NHWCInput (the flatten after pooling stays one Reshape)
            logits = self.model(images.permute(0, 3, 1, 2).contiguous())
        finally:
            handle.remove()
        return logits, seen[0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.features(images)
        # A 1 × 1 convolution by the head's weights: the same product as einsum("nchw,kc->nkhw"), as an operator
        # every runtime has (OpenCV 4's Einsum layer refuses a dynamic batch).
        return logits, nn.functional.conv2d(features, self.head.weight[:, :, None, None])

    def term_sizes(self, features: torch.Tensor) -> torch.Tensor:
        """Σ_c |W[k, c] · F[c]| at every pixel: the size of the terms each map value sums. Rounding in float32
        is relative to it, not to the (possibly much smaller, cancelled) sum."""
        return nn.functional.conv2d(features.abs(), self.head.weight.abs()[:, :, None, None])
