"""Small helpers shared by several test files."""
import copy

import torch


def perturbed_copy(model, seed: int, scale: float = 0.05):
    """A copy of ``model`` with every parameter nudged by seeded noise (a 'fine-tuned' child of the trunk)."""
    child = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in child.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return child
