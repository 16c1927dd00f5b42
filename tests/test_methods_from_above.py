"""Code that runs a module's layers other than through its forward, found
by review: a method or property of a module called from above, the code
a store on the module runs (a property's setter, ``__setattr__``), a
class ``__call__`` of its own.  Each folded wrong without an example
input (relative error 1.0 to 1.9 in the mode that runs that code), and
now stays unfolded where the data flow is not proven."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusion_checks import fuse_and_compare, kept_at

X = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(0))


def conv_bn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))


class Head(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.raw_name = 'conv'

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class WithHead(nn.Module):
    """``loss`` mode calls ``self.head.features``."""

    head_class = Head

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.head = self.head_class()

    def forward(self, x, mode='tensor'):
        y = self.backbone(x)
        return self.head(y) if mode == 'tensor' else self.head.features(y)


class SequentialHead(nn.Sequential):

    def __init__(self):
        super().__init__(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))

    def features(self, x):
        return self[0](x)  # (``PUSH_NULL``, ``self``: not ``self(x)``)


class BaseRaw(Head):

    def forward(self, x):
        return self.conv(x)


class SuperHead(BaseRaw):

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

    def features(self, x):
        return super().forward(x)  # the base's forward: the conv alone


class GetattrHead(Head):

    def features(self, x):
        return getattr(self, 'conv')(x)


class ComputedGetattrHead(Head):

    def features(self, x):
        return getattr(self, self.raw_name)(x)


class PartialHead(Head):

    def forward(self, x):
        return self._run(x, True)

    def _run(self, x, norm):
        y = self.conv(x)
        return self.bn(y) if norm else y

    features = functools.partialmethod(_run, norm=False)


class CachedHead(Head):

    @functools.cached_property
    def features(self):
        return self.conv


class GetattrHookHead(Head):

    def __getattr__(self, name):
        if name == 'features':
            return self._modules['conv']
        return super().__getattr__(name)


class SetterHead(Head):

    @property
    def inp(self):
        return None

    @inp.setter
    def inp(self, x):
        self.__dict__['_raw'] = self.conv(x)

    def features(self, x):
        self.inp = x
        return self._raw


def with_head(head_class: type) -> type:
    return type(f'With{head_class.__name__}', (WithHead, ),
                {'head_class': head_class})


class IndexesItself(nn.Sequential):
    """Not traced (an optional argument); its forward indexes itself."""

    def forward(self, x, mode='tensor'):
        if mode == 'tensor':
            return super().forward(x)
        return self[0][0](x)


def indexes_itself() -> nn.Module:
    return IndexesItself(conv_bn(), nn.ReLU())


class SetterForward(nn.Module):

    def __init__(self):
        super().__init__()
        self.block = conv_bn()

    @property
    def inp(self):
        return None

    @inp.setter
    def inp(self, x):
        self.__dict__['_raw'] = self.block[0](x)

    def forward(self, x, mode='tensor'):
        if mode == 'tensor':
            return self.block(x)
        self.inp = x
        return self._raw


class SetattrForward(nn.Module):

    def __init__(self):
        super().__init__()
        self.block = conv_bn()

    def __setattr__(self, name, value):
        if name == 'inp':
            value = self.block[0](value)
        super().__setattr__(name, value)

    def forward(self, x, mode='tensor'):
        if mode == 'tensor':
            return self.block(x)
        self.inp = x
        return self.inp


class CachedForward(nn.Module):

    def __init__(self):
        super().__init__()
        self.block = conv_bn()

    @functools.cached_property
    def first(self):
        return self.block[0]

    def forward(self, x, mode='tensor'):
        return self.block(x) if mode == 'tensor' else self.first(x)


class RawNeck(Head):

    def raw(self, x):
        return self.conv(x)


class PeerHead(nn.Module):
    """Holds a sibling in a plain list; a method uses it."""

    def __init__(self, neck: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.peer = [neck]

    def forward(self, x):
        return self.conv(x)

    def features(self, x):
        return self.peer[0].raw(x)


class HeldByAMethod(nn.Module):

    def __init__(self):
        super().__init__()
        self.neck = RawNeck()
        self.head = PeerHead(self.neck)

    def forward(self, x, mode='tensor'):
        y = self.neck(x)
        return self.head(y) if mode == 'tensor' else self.head.features(x)


class OwnCall(nn.Module):
    """A class ``__call__`` of its own, which structure does not read."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.head = Head()

    def forward(self, x):
        return self.head(self.backbone(x))

    def __call__(self, x, mode='tensor'):
        if mode == 'tensor':
            return super().__call__(x)
        return self.head.conv(self.backbone(x))


class HoldsOwnCall(nn.Module):

    def __init__(self):
        super().__init__()
        self.inner = OwnCall()

    def forward(self, x, mode='tensor'):
        return self.inner(x, mode)


@pytest.mark.parametrize('model, kept', [
    (with_head(SequentialHead), ['head.1']),
    (with_head(SuperHead), ['head.bn']),
    (with_head(GetattrHead), ['head.bn']),
    (with_head(ComputedGetattrHead), ['head.bn']),
    (with_head(PartialHead), ['head.bn']),
    (with_head(CachedHead), ['head.bn']),
    (with_head(GetattrHookHead), ['head.bn']),
    (with_head(SetterHead), ['head.bn']),
    (indexes_itself, ['0.1']),
    (SetterForward, ['block.1']),
    (SetattrForward, ['block.1']),
    (CachedForward, ['block.1']),
    (HeldByAMethod, ['neck.bn']),
    (OwnCall, ['head.bn']),
    (HoldsOwnCall, ['inner.head.bn']),
])
def test_layers_run_other_than_by_their_forward_keep_their_norm(
        model, kept):
    fused, _, rel = fuse_and_compare(model(), (X, 'loss'), traced=False)
    assert rel < 1e-5
    kept_at(fused, kept)
