"""PyTorch definitions of the CIFAR ResNets and wide ResNets, for the tests.

Written for these tests after the reference definitions of mdistiller
(`mdistiller/models/cifar/resnet.py`, `resnetv2.py` and `wrn.py` at commit
a08d46f): the same module paths, which are the state-dict keys, and the
same computation. Each model returns `(logits, features)`, the features
being the reference's dict of `"feats"`, `"preact_feats"` and
`"pooled_feat"`.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin, cout, kernel, stride=1):
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2,
                     bias=False)


def _projection(cin, cout, stride):
    # A strided 1x1 convolution and batch norm: paths `<name>.0`, `<name>.1`.
    return nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride, shortcut):
        super().__init__()
        self.conv1 = _conv(cin, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.project = stride != 1 or cin != planes
        if self.project:
            setattr(self, shortcut, _projection(cin, planes, stride))
        self.shortcut_name = shortcut

    def residual(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(y))

    def forward(self, x):
        """The sum before the block's final ReLU."""
        skip = getattr(self, self.shortcut_name)(x) if self.project else x
        return self.residual(x) + skip


class Bottleneck(Basic):
    expansion = 4

    def __init__(self, cin, planes, stride, shortcut):
        nn.Module.__init__(self)
        out = 4 * planes
        self.conv1 = _conv(cin, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, out, 1)
        self.bn3 = nn.BatchNorm2d(out)
        self.project = stride != 1 or cin != out
        if self.project:
            setattr(self, shortcut, _projection(cin, out, stride))
        self.shortcut_name = shortcut

    def residual(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return self.bn3(self.conv3(y))


class ResNet(nn.Module):
    """`resnet.py`'s ResNet (`shortcut="downsample"`, classifier `fc`,
    8x8 average pooling) or `resnetv2.py`'s (`"shortcut"`, `linear`,
    adaptive average pooling)."""

    def __init__(self, block, widths, blocks, num_classes, *, shortcut,
                 classifier, adaptive_pool):
        super().__init__()
        self.conv1 = _conv(3, widths[0], 3)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        self.stages = []
        for index, (planes, count) in enumerate(zip(widths[1:], blocks),
                                                start=1):
            layer = nn.Sequential()
            for i in range(count):
                stride = 2 if index > 1 and i == 0 else 1
                layer.append(block(cin, planes, stride, shortcut))
                cin = planes * block.expansion
            setattr(self, f"layer{index}", layer)
            self.stages.append(layer)
        self.classifier = classifier
        setattr(self, classifier, nn.Linear(cin, num_classes))
        self.adaptive_pool = adaptive_pool

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        feats, preacts = [x], [x]
        for layer in self.stages:
            for block in layer:
                preact = block(x)
                x = F.relu(preact)
            feats.append(x)
            preacts.append(preact)
        if self.adaptive_pool:
            x = F.adaptive_avg_pool2d(x, 1)
        else:
            x = F.avg_pool2d(x, 8)
        pooled = x.flatten(1)
        logits = getattr(self, self.classifier)(pooled)
        return logits, {"feats": feats, "preact_feats": preacts,
                        "pooled_feat": pooled}


class WideBlock(nn.Module):
    def __init__(self, cin, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv(cin, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.convShortcut = (None if cin == planes
                             else _conv(cin, planes, 1, stride))

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        if self.convShortcut is None:
            return x + y
        return self.convShortcut(activated) + y


class WideStage(nn.Module):
    def __init__(self, cin, planes, count, stride):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBlock(cin if i == 0 else planes, planes,
                      stride if i == 0 else 1) for i in range(count)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, widen_factor, num_classes):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16 * widen_factor * 2 ** i for i in range(3)]
        self.conv1 = _conv(3, 16, 3)
        self.block1 = WideStage(16, widths[0], n, 1)
        self.block2 = WideStage(widths[0], widths[1], n, 2)
        self.block3 = WideStage(widths[1], widths[2], n, 2)
        self.bn1 = nn.BatchNorm2d(widths[2])
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x):
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        x = F.avg_pool2d(F.relu(self.bn1(f3)), 8)
        pooled = x.flatten(1)
        preacts = [f0, self.block2.layer[0].bn1(f1),
                   self.block3.layer[0].bn1(f2), self.bn1(f3)]
        return self.fc(pooled), {"feats": [f0, f1, f2, f3],
                                 "preact_feats": preacts,
                                 "pooled_feat": pooled}


def _cifar_resnet(depth, widths):
    def build(num_classes=100):
        n = (depth - 2) // 6
        return ResNet(Basic, widths, [n] * 3, num_classes,
                      shortcut="downsample", classifier="fc",
                      adaptive_pool=False)
    return build


def _resnet_v2(block, blocks):
    def build(num_classes=100):
        return ResNet(block, (64, 64, 128, 256, 512), blocks, num_classes,
                      shortcut="shortcut", classifier="linear",
                      adaptive_pool=True)
    return build


def _wrn(depth, widen_factor):
    def build(num_classes=100):
        return WideResNet(depth, widen_factor, num_classes)
    return build


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)

# Keras builder name -> PyTorch builder.
BUILDERS = {
    **{f"resnet{d}": _cifar_resnet(d, _NARROW)
       for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _cifar_resnet(8, _WIDE),
    "resnet32x4": _cifar_resnet(32, _WIDE),
    "resnet18": _resnet_v2(Basic, (2, 2, 2, 2)),
    "resnet50": _resnet_v2(Bottleneck, (3, 4, 6, 3)),
    "wrn_16_1": _wrn(16, 1),
    "wrn_16_2": _wrn(16, 2),
    "wrn_40_1": _wrn(40, 1),
    "wrn_40_2": _wrn(40, 2),
}


def randomized(model, seed=0):
    """`model` in eval mode with random weights and random batch-norm
    scales, offsets and running statistics (not the identity that a fresh
    batch norm computes)."""
    generator = torch.Generator().manual_seed(seed)

    def draw(shape, low, high):
        return torch.rand(shape, generator=generator) * (high - low) + low

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                bound = (3.0 / fan_in) ** 0.5
                module.weight.copy_(draw(module.weight.shape, -bound, bound))
                if module.bias is not None:
                    module.bias.copy_(draw(module.bias.shape, -0.5, 0.5))
            elif isinstance(module, nn.BatchNorm2d):
                shape = module.weight.shape
                module.weight.copy_(draw(shape, 0.5, 1.5))
                module.bias.copy_(draw(shape, -0.3, 0.3))
                module.running_mean.copy_(draw(shape, -0.3, 0.3))
                module.running_var.copy_(draw(shape, 0.5, 2.0))
    return model.eval()
