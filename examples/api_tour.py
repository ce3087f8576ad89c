"""A five-minute tour of the capsnet Python API (runs in a few seconds on a CPU).

python examples/api_tour.py
"""

import torch
from torch import nn

import capsnet
from capsnet import functional as CF
from capsnet.layers import DenseCapsules, PrimaryCapsules, capsule_lengths

torch.manual_seed(0)

# 1. The math is plain functions on tensors: routing takes (..., in_caps, out_caps, dim).
u_hat = torch.randn(8, 1152, 10, 16)  # predictions u_hat[j|i] of 1152 children for 10 parents
v, c = CF.dynamic_routing(u_hat, iterations=3)  # v: (8, 10, 16), c: (8, 1152, 10)
print("dynamic routing:", tuple(v.shape), "coupling sums", c.sum(-1).mean().item())

votes = torch.randn(8, 72, 5, 16)  # 72 children vote for 5 parents with 4x4 poses
activations = torch.rand(8, 72)
poses, out_act, assignments = CF.em_routing(votes, activations, beta_u=0.0, beta_a=0.0)
print("EM routing:", tuple(poses.shape), tuple(out_act.shape))


# 2. Layers drop into your own PyTorch models.
class TinyCapsNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 64, 5), nn.ReLU())  # 28 -> 24
        self.primary = PrimaryCapsules(64, out_types=8, pose_dim=8, kernel_size=9, stride=2)
        self.classes = DenseCapsules(
            in_caps=8 * 8 * 8, in_dim=8, out_caps=num_classes, out_dim=16, iterations=3
        )

    def forward(self, x):
        return capsule_lengths(self.classes(self.primary(self.stem(x))))


tiny = TinyCapsNet()
images, labels = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
loss = CF.margin_loss(tiny(images), labels)
loss.backward()
print("tiny model margin loss:", round(loss.item(), 4))

# 3. The papers' models come from a registry and share one output type.
print("models:", capsnet.models.list_models())
model = capsnet.models.create("matrix_capsnet", preset="small", num_classes=10, input_size=28)
out = model(images)  # ModelOutput(scores, poses, reconstructions)
print("matrix capsnet scores:", tuple(out.scores.shape), "poses:", tuple(out.poses.shape))
