"""PyTorch definitions of the CIFAR VGG, MobileNetV2 and ShuffleNets.

Written for the tests, after mdistiller's `mdistiller/models/cifar/`
(`vgg.py`, `mobilenetv2.py`, `ShuffleNetv1.py`, `ShuffleNetv2.py`): the
same module paths (so the same state-dict keys) and the same computation.
Each model's `forward` returns the logits and a dict of the features that
the Keras models name: `stem`, `stage1` ..., `stage1_preact` ..., `pooled`.
"""

import torch
from torch import nn
from torch.nn import functional as F


def _named(feats, preacts, pooled):
    out = {"stem": feats[0], "pooled": pooled}
    for k, (feat, preact) in enumerate(zip(feats[1:], preacts[1:]), 1):
        out[f"stage{k}"] = feat
        out[f"stage{k}_preact"] = preact
    return out


def _shuffle(x, groups):
    n, c, h, w = x.shape
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2)
    return x.reshape(n, c, h, w)


# VGG (mdistiller `vgg.py`, the `_bn` variants).

VGG_WIDTHS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


class VGG(nn.Module):
    def __init__(self, widths, num_classes=100):
        super().__init__()
        channels = 3
        for i, block in enumerate(widths):
            modules = []
            for width in block:
                modules += [nn.Conv2d(channels, width, 3, padding=1),
                            nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            setattr(self, f"block{i}", nn.Sequential(*modules[:-1]))
        for i in range(4):
            setattr(self, f"pool{i}", nn.MaxPool2d(2, 2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        x = F.relu(self.block0(x))
        feats, preacts = [x], [x]
        for i in range(1, 5):
            # The pooling after block 3 runs on 64x64 inputs only.
            if i < 4:
                x = getattr(self, f"pool{i - 1}")(x)
            x = getattr(self, f"block{i}")(x)
            preacts.append(x)
            x = F.relu(x)
            feats.append(x)
        pooled = self.pool4(x).flatten(1)
        return self.classifier(pooled), _named(feats, preacts, pooled)


# MobileNetV2 (mdistiller `mobilenetv2.py`, `mobile_half`).

class InvertedResidual(nn.Module):
    def __init__(self, channels, filters, stride, expansion):
        super().__init__()
        hidden = channels * expansion
        self.residual = stride == 1 and channels == filters
        self.conv = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden,
                      bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, filters, 1, bias=False),
            nn.BatchNorm2d(filters))

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Half(nn.Module):
    # (expansion, channels at width 1, blocks, stride)
    GROUPS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
              (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes=100):
        super().__init__()
        channels = 16
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, channels, 3, 2, 1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.ModuleList()
        for expansion, width, count, stride in self.GROUPS:
            group = []
            for k in range(count):
                group.append(InvertedResidual(
                    channels, width // 2, stride if k == 0 else 1,
                    expansion))
                channels = width // 2
            self.blocks.append(nn.Sequential(*group))
        self.conv2 = nn.Sequential(
            nn.Conv2d(channels, 1280, 1, bias=False), nn.BatchNorm2d(1280),
            nn.ReLU())
        self.avgpool = nn.AvgPool2d(2, ceil_mode=True)
        self.classifier = nn.Sequential(nn.Linear(1280, num_classes))

    def forward(self, x):
        x = self.conv1(x)
        feats = [x]
        for i, group in enumerate(self.blocks):
            x = group(x)
            if i in (1, 2, 4, 6):
                feats.append(x)
        pooled = self.avgpool(self.conv2(x)).flatten(1)
        # No ReLU ends a group: the stages are their own `preact`.
        return self.classifier(pooled), _named(feats, feats, pooled)


# ShuffleNet V1 (mdistiller `ShuffleNetv1.py`, `ShuffleV1`).

class ShuffleV1Block(nn.Module):
    def __init__(self, channels, filters, stride, groups):
        super().__init__()
        middle = filters // 4
        self.stride = stride
        self.first_groups = 1 if channels == 24 else groups
        self.conv1 = nn.Conv2d(channels, middle, 1, groups=self.first_groups,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(middle)
        self.conv2 = nn.Conv2d(middle, middle, 3, stride, 1, groups=middle,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(middle)
        self.conv3 = nn.Conv2d(middle, filters, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(filters)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, 2, padding=1))

    def forward(self, x):
        y = _shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        skip = self.shortcut(x)
        preact = torch.cat([y, skip], 1) if self.stride == 2 else y + skip
        return F.relu(preact), preact


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes=100, groups=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        channels = 24
        for i, (width, count) in enumerate(zip((240, 480, 960), (4, 8, 4))):
            blocks = []
            for k in range(count):
                blocks.append(ShuffleV1Block(
                    channels, width - channels if k == 0 else width,
                    2 if k == 0 else 1, groups))
                channels = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(960, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        feats, preacts = [x], [x]
        for i in range(1, 4):
            for block in getattr(self, f"layer{i}"):
                x, preact = block(x)
            feats.append(x)
            preacts.append(preact)
        pooled = F.avg_pool2d(x, 4).flatten(1)
        return self.linear(pooled), _named(feats, preacts, pooled)


# ShuffleNet V2 (mdistiller `ShuffleNetv2.py`, `ShuffleV2`, net size 1).

class ShuffleV2Down(nn.Module):
    def __init__(self, channels, filters):
        super().__init__()
        half = filters // 2
        self.conv1 = nn.Conv2d(channels, channels, 3, 2, 1, groups=channels,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, half, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(channels, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.conv4 = nn.Conv2d(half, half, 3, 2, 1, groups=half, bias=False)
        self.bn4 = nn.BatchNorm2d(half)
        self.conv5 = nn.Conv2d(half, half, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(half)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return _shuffle(torch.cat([left, right], 1), 2), None


class ShuffleV2Basic(nn.Module):
    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x):
        half = x.shape[1] // 2
        kept, y = x[:, :half], x[:, half:]
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(y)))))
        y = self.bn3(self.conv3(y))
        # The reference's `preact` is taken before the shuffle.
        preact = torch.cat([kept, y], 1)
        return _shuffle(torch.cat([kept, F.relu(y)], 1), 2), preact


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        channels = 24
        for i, (width, count) in enumerate(zip((116, 232, 464), (3, 7, 3))):
            blocks = [ShuffleV2Down(channels, width)]
            blocks += [ShuffleV2Basic(width) for _ in range(count)]
            channels = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.conv2 = nn.Conv2d(464, 1024, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1024)
        self.linear = nn.Linear(1024, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        feats, preacts = [x], [x]
        for i in range(1, 4):
            for block in getattr(self, f"layer{i}"):
                x, preact = block(x)
            feats.append(x)
            preacts.append(preact)
        x = F.relu(self.bn2(self.conv2(x)))
        pooled = F.avg_pool2d(x, 4).flatten(1)
        return self.linear(pooled), _named(feats, preacts, pooled)


def build(name, num_classes=100):
    """The reference model named as the Keras builder `name`."""
    if name in VGG_WIDTHS:
        return VGG(VGG_WIDTHS[name], num_classes)
    return {"mobilenetv2": MobileNetV2Half, "shufflenet_v1": ShuffleNetV1,
            "shufflenet_v2": ShuffleNetV2}[name](num_classes)


def randomize(model, seed=0):
    """Random weights and batch-norm statistics, in place; eval mode.

    Convolutions get He-normal weights, so that the features keep their
    scale through the depth; each batch normalization gets a scale, shift,
    running mean and running variance away from their defaults.
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=generator)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=generator)
                    * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(draw(module.bias.shape, -0.2, 0.2))
            elif isinstance(module, nn.BatchNorm2d):
                shape = module.weight.shape
                module.weight.copy_(draw(shape, 0.5, 1.5))
                module.bias.copy_(draw(shape, -0.3, 0.3))
                module.running_mean.copy_(draw(shape, -0.3, 0.3))
                module.running_var.copy_(draw(shape, 0.5, 2.0))
            elif isinstance(module, nn.Linear):
                module.weight.copy_(draw(module.weight.shape, -0.1, 0.1))
                module.bias.copy_(draw(module.bias.shape, -0.1, 0.1))
    return model.eval()
