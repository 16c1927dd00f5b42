"""The module-forward tracer against torch.fx's own, and its guarantees."""
import collections.abc
import contextlib
import functools
import os
import types

import pytest
import torch
from torch import fx, nn

from fusion_checks import fuse_and_compare
from mmfuse import discover_folds, fuse_model
from mmfuse.discovery.fx_tracer import (ModuleForwardTracer,
                                        trace_module_forward)
from mmfuse.reparam.code_scan import forward_may_add


class _StockLeafTracer(fx.Tracer):
    """torch.fx's tracer with the same leaves, for comparison."""

    def __init__(self, root):
        super().__init__(autowrap_modules=(), autowrap_functions=())
        self.root_module = root

    def is_leaf_module(self, m, qualname):
        return m is not self.root_module


def _calls(graph: fx.Graph):
    """Each node's kind, target and arguments, a node argument told by
    its position in the graph (names may differ)."""
    position = {node: index for index, node in enumerate(graph.nodes)}
    return [(n.op, str(n.target),
             fx.node.map_arg(n.args, lambda a: position[a]),
             fx.node.map_arg(n.kwargs, lambda a: position[a]))
            for n in graph.nodes]


class Block(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.branches = nn.ModuleList([nn.Conv2d(4, 4, 1), nn.Identity()])
        self.seq = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        y = self.branches[0](x) + self.branches[1](x)
        return self.seq[1](self.seq[0](y)) * self.scale + x


class Deep(nn.Module):
    """Calls a grandchild through a child that is not a container."""

    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x):
        return self.block.bn1(self.block.conv1(x))


class Keywords(nn.Module):
    """Operations with keyword arguments, a method call, a constant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        y = torch.cat([y, y.flip(1)], dim=1)
        return self.bn(y).sum(dim=1, keepdim=True) * 0.5


class Outside(nn.Module):

    def __init__(self, other: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.__dict__['other'] = other  # not registered

    def forward(self, x):
        return self.other(self.conv(x))


class CatchesRefusal(Outside):

    def forward(self, x):
        try:
            return self.other(self.conv(x))
        except Exception:  # the trace must not take this way out
            return self.conv(x)


@pytest.mark.parametrize('make', [Block, Deep, Keywords])
def test_same_graph_as_torch_fx(make):
    module = make().eval()
    ours = ModuleForwardTracer(module).trace(module)
    stock = _StockLeafTracer(module).trace(module)
    assert _calls(ours) == _calls(stock)
    targets = [n.target for n in ours.nodes if n.op == 'call_module']
    assert targets  # a module call is one node, not its insides
    assert all(not isinstance(module.get_submodule(t), Block)
               for t in targets)


def test_module_class_and_instances_are_left_as_they_were():
    module = Block().eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        before = module(x)
    attributes = {m: dict(m.__dict__) for m in module.modules()}
    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    ModuleForwardTracer(module).trace(module)
    assert nn.Module.__call__ is call
    assert nn.Module.__getattr__ is getattr_
    for sub in module.modules():
        assert '_compiled_call_impl' not in sub.__dict__
        assert sub.__dict__.keys() == attributes[sub].keys()
    with torch.no_grad():
        assert torch.equal(module(x), before)


def test_reports_tracing_to_the_code_it_traces():
    seen = []

    class Probe(nn.Module):

        def forward(self, x):
            seen.append(torch.fx._symbolic_trace.is_fx_tracing())
            return x

    probe = Probe()
    ModuleForwardTracer(probe).trace(probe)
    assert seen == [True]
    assert not torch.fx._symbolic_trace.is_fx_tracing()


@pytest.mark.parametrize('make', [Outside, CatchesRefusal])
def test_call_of_a_module_outside_fails(make):
    module = make(nn.Conv2d(3, 3, 1)).eval()
    with pytest.raises(NameError, match='not one of its submodules'):
        ModuleForwardTracer(module).trace(module)
    for sub in module.modules():
        assert '_compiled_call_impl' not in sub.__dict__


def test_compiled_call_slot_is_put_back():
    module = Block().eval()
    marker = module.conv1._call_impl
    module.conv1.__dict__['_compiled_call_impl'] = marker
    ModuleForwardTracer(module).trace(module)
    assert module.conv1.__dict__['_compiled_call_impl'] is marker


class Chain(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Helper(Chain):

    def forward(self, x):
        return self._impl(x)

    def _impl(self, x):
        return self.conv(x) + x


class Super(Helper):

    def forward(self, x):
        return super().forward(x)


class TorchAdd(Chain):

    def forward(self, x):
        return torch.add(self.conv(x), x)


class Summed(Chain):

    def forward(self, x):
        return sum([self.conv(x), x])


def _decorate(func):

    def wrapper(self, x):
        return func(self, x)

    return wrapper


class Decorated(Chain):

    @_decorate
    def forward(self, x):
        return self.conv(x) - x


@pytest.mark.parametrize('make,expected', [(Chain, False), (Helper, True),
                                           (Super, True), (TorchAdd, True),
                                           (Summed, True),
                                           (Decorated, True)])
def test_code_scan_finds_every_way_to_add(make, expected):
    assert forward_may_add(make()) is expected


def test_other_threads_run_their_modules_during_a_trace():
    import threading
    other = nn.Conv2d(3, 3, 1)
    results = []

    class StartsThread(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            worker = threading.Thread(
                target=lambda: results.append(other(torch.ones(1, 3, 2, 2))))
            worker.start()
            worker.join()
            return self.conv(x)

    module = StartsThread()
    graph = ModuleForwardTracer(module).trace(module)
    assert [n.target for n in graph.nodes if n.op == 'call_module'] == \
        ['conv']
    assert len(results) == 1 and results[0].shape == (1, 3, 2, 2)


class _TypeTest(nn.Module):
    """Traced, a proxy is no tensor and would lead the forward the second
    way, where the norm folds; run, the input is a tensor and the conv's
    output also skips the norm, so folding it would change the output."""

    def __init__(self, test):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.test = test

    def forward(self, x):
        y = self.conv(x)
        if self.test(x, y):
            return self.bn(y) + y
        return self.bn(y)


_TYPE_TESTS = {
    'input is a tensor': lambda x, y: isinstance(x, torch.Tensor),
    'output is a tensor': lambda x, y: isinstance(y, torch.Tensor),
    'not a tuple': lambda x, y: not isinstance(y, (tuple, list)),
    'an abstract class': lambda x, y: not isinstance(
        y, collections.abc.Sequence),
    'a shape is a tuple': lambda x, y: isinstance(x.shape, tuple),
    'torch.is_tensor': lambda x, y: torch.is_tensor(y),
    'a dtype': lambda x, y: isinstance(y.dtype, torch.dtype),
}


@pytest.mark.parametrize('test', list(_TYPE_TESTS.values()),
                         ids=list(_TYPE_TESTS))
def test_a_forward_that_tests_a_traced_type_is_not_traced(test):
    module = _TypeTest(test).eval()
    with pytest.raises(fx.proxy.TraceError, match='tests the type'):
        ModuleForwardTracer(module).trace(module)
    fused, _, rel = fuse_and_compare(_TypeTest(test), (torch.randn(
        1, 3, 4, 4), ), traced=False)
    assert rel < 1e-5
    assert isinstance(fused.bn, nn.BatchNorm2d)
    # With the data flow observed, the norm is rightly left too.
    fused, report, rel = fuse_and_compare(_TypeTest(test), (torch.randn(
        1, 3, 4, 4), ), traced=True)
    assert rel < 1e-5 and not report.folded


def _is_plain_tensor(value):
    return type(value) is torch.Tensor


_kind_of = type


class _TypeCall(nn.Module):
    """Traced, ``type(y)`` of a proxy is not ``torch.Tensor`` and the
    forward goes the second way, where the norm folds; run, the conv's
    output also skips the norm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        if self.plain(y):
            return self.bn(y) + y
        return self.bn(y)


class _TypeInForward(_TypeCall):

    def forward(self, x):
        y = self.conv(x)
        if type(y) is torch.Tensor:
            return self.bn(y) + y
        return self.bn(y)


class _TypeInMethod(_TypeCall):

    def plain(self, y):
        return type(y) is torch.Tensor


class _TypeInFunction(_TypeCall):

    def plain(self, y):
        return (lambda v: _is_plain_tensor(v))(y)


def _own_decorator(function):

    @functools.wraps(function)
    def wrapper(*args):
        return function(*args)

    return wrapper


def _plain_tensor_via_partial(value, kind=torch.Tensor):
    return type(value) is kind


_helpers = types.ModuleType('helpers')
_helpers.plain = _is_plain_tensor
_plain_partial = functools.partial(_plain_tensor_via_partial)


class _TypeInBase(_TypeInForward):

    def forward(self, x):
        return super().forward(x)


class _TypeUnderNoGrad(_TypeCall):

    @torch.no_grad()
    def forward(self, x):
        y = self.conv(x)
        if type(y) is torch.Tensor:
            return self.bn(y) + y
        return self.bn(y)


class _TypeUnderAnotherName(_TypeCall):

    def plain(self, y):
        return _kind_of(y) is torch.Tensor


class _TypeInAnotherClass(_TypeCall):

    def forward(self, x):
        return _TypeInForward.forward(self, x)


class _TypeUnderOwnDecorator(_TypeCall):

    @_own_decorator
    def forward(self, x):
        y = self.conv(x)
        if type(y) is torch.Tensor:
            return self.bn(y) + y
        return self.bn(y)


class _TypeInProperty(_TypeCall):

    @property
    def kind(self):
        return type(self.conv.weight)

    def plain(self, y):
        return not isinstance(self.kind, str)


class _TypeInModuleFunction(_TypeCall):

    def plain(self, y):
        return _helpers.plain(y)


class _TypeInPartial(_TypeCall):

    def plain(self, y):
        return _plain_partial(y)


_TYPE_CALLERS = [
    _TypeInForward, _TypeInMethod, _TypeInFunction, _TypeInBase,
    _TypeUnderNoGrad, _TypeUnderAnotherName, _TypeInAnotherClass,
    _TypeUnderOwnDecorator,
    _TypeInModuleFunction, _TypeInPartial
]


@pytest.mark.parametrize('cls', _TYPE_CALLERS,
                         ids=[c.__name__ for c in _TYPE_CALLERS])
def test_a_forward_that_calls_type_is_not_traced(cls):
    module = cls().eval()
    with pytest.raises(fx.proxy.TraceError, match='calls type'):
        ModuleForwardTracer(module).trace(module)
    fused, _, rel = fuse_and_compare(cls(), (torch.randn(1, 3, 4, 4), ),
                                     traced=False)
    assert rel < 1e-5 and isinstance(fused.bn, nn.BatchNorm2d)
    report = fuse_model(cls().eval())
    assert not report.folded
    # (``type(y) is torch.Tensor`` in the forward itself is also an
    # identity test on a traced value, which keeps it first.)
    assert any('calls type()' in skip.reason or 'by identity' in skip.reason
               for skip in report.left)


def test_a_property_that_calls_type_is_read_too():
    module = _TypeInProperty().eval()
    with pytest.raises(fx.proxy.TraceError, match='calls type'):
        ModuleForwardTracer(module).trace(module)


def test_the_type_scan_follows_a_new_forward():

    class Clean(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x))

    module = Clean().eval()
    assert ModuleForwardTracer(module).trace(module) is not None
    Clean.forward = _TypeInForward.forward
    with pytest.raises(fx.proxy.TraceError, match='calls type'):
        ModuleForwardTracer(module).trace(module)


def test_type_in_init_elsewhere_or_as_an_attribute_name_is_traced():
    # Only the code a forward may run counts (mmengine's ``BaseModule``
    # calls ``type`` in ``init_weights``, which every OpenMMLab module
    # has).

    class Named(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            self.kind = type(self.conv).__name__
            self.type = 'plain'

        def forward(self, x):
            # pytest rewrites this assert to call its own helpers (which
            # call type()) through '@pytest_ar': not the model's code.
            assert self.type in ('plain', 'other'), self.type
            if self.type == 'plain':
                return self.bn(self.conv(x))
            return x

        def describe(self):
            return type(self.conv).__name__

    module = Named().eval()
    assert ModuleForwardTracer(module).trace(module) is not None
    fused, _, rel = fuse_and_compare(Named(), (torch.randn(1, 3, 4, 4), ),
                                     traced=False)
    assert rel < 1e-5 and isinstance(fused.bn, nn.Identity)


def test_types_torch_tests_on_its_own_behalf_do_not_count():
    # Every operation below makes torch.fx test the types of traced values
    # (arguments, parameters, dtypes) on its own behalf.
    class Busy(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.bn(self.conv(x * self.conv.weight.sum() + 1))
            return torch.cat([y, y.flip(1)], dim=1).sum(
                dim=(2, 3), keepdim=True).to(x.dtype)

    module = Busy().eval()
    assert ModuleForwardTracer(module).trace(module) is not None


class _OwnCall(nn.ReLU):
    """A child with its own ``__call__``: the stock torch.fx trace runs."""

    def __call__(self, x):
        return super().__call__(x)


def test_a_type_test_fails_the_stock_trace_too():

    class Tests(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            self.act = _OwnCall()

        def forward(self, x):
            y = self.conv(x)
            if isinstance(y, torch.Tensor):
                return self.act(self.bn(y)) + y
            return self.act(self.bn(y))

    module = Tests().eval()
    with pytest.raises(fx.proxy.TraceError, match='tests the type'):
        ModuleForwardTracer(module).trace(module)
    fused, _, rel = fuse_and_compare(Tests(), (torch.randn(1, 3, 4, 4), ),
                                     traced=False)
    assert rel < 1e-5 and isinstance(fused.bn, nn.BatchNorm2d)


def test_packages_installed_inside_the_standard_library_are_model_code(
        monkeypatch, tmp_path):
    """conda, /usr/local images and a plain pyenv install packages below
    the standard library's folder: their code is the model's, not
    Python's (whose type tests are looked through)."""
    from mmfuse.discovery import fx_tracer
    stdlib = str(tmp_path) + os.sep
    monkeypatch.setattr(fx_tracer, '_STANDARD_LIBRARY', stdlib)
    monkeypatch.setattr(fx_tracer, '_INSTALLED',
                        (os.path.join(stdlib, 'site-packages') + os.sep, ))
    monkeypatch.setattr(fx_tracer, '_KINDS', {})
    assert fx_tracer.code_kind(os.path.join(stdlib, 'abc.py')) == 'library'
    assert fx_tracer.code_kind(
        os.path.join(stdlib, 'site-packages', 'mmdet', 'x.py')) == 'model'
    assert fx_tracer.code_kind(fx.__file__) == 'tracer'
    assert fx_tracer.code_kind(torch.__file__) == 'library'
    assert fx_tracer.code_kind(__file__) == 'model'


def test_a_forward_with_optional_arguments_is_not_traced():
    """Traced, ``scale`` is a proxy, never None: the trace takes the way of
    a call that gives it, where the norm folds; called as ``m(x)``, the
    conv's output is doubled before the norm."""

    class Optional_(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x, scale=None):
            y = self.conv(x)
            if scale is None:
                y = y * 2
            return self.bn(y)

    plan = discover_folds(Optional_().eval())
    assert not plan.folds
    assert 'optional arguments (scale)' in plan.skipped[0].reason
    fused, _, rel = fuse_and_compare(Optional_(), (torch.randn(
        1, 3, 4, 4), ), traced=False)
    assert rel < 1e-5 and isinstance(fused.bn, nn.BatchNorm2d)


class _EntersAutocast(nn.Module):

    def __init__(self, **autocast):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.autocast = autocast

    def forward(self, x):
        with torch.autocast('cpu', **self.autocast):
            return self.conv(x) + 1


@pytest.mark.parametrize('ambient, entered', [
    (None, dict(dtype=torch.bfloat16)),
    (dict(dtype=torch.bfloat16), dict(enabled=False)),
    (dict(dtype=torch.bfloat16), dict(dtype=torch.float16)),
])
def test_a_forward_that_enters_autocast_is_not_traced(ambient, entered):
    """torch.fx does not record the context manager: the graph would not
    show the operations' dtype (a merge dropped a bfloat16 region)."""
    module = _EntersAutocast(**entered)
    context = torch.autocast('cpu', **ambient) if ambient else \
        contextlib.nullcontext()
    with context, pytest.raises(fx.proxy.TraceError,
                                match='changes torch.autocast'):
        trace_module_forward(module)
    # Entered as it already is, it changes nothing: traced.
    with torch.autocast('cpu', dtype=torch.bfloat16):
        trace_module_forward(_EntersAutocast(dtype=torch.bfloat16))


class _AddsAHolder(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if 'aux' not in self._modules:
            holder = nn.Module()
            holder.t = torch.ones(3, 1, 1)
            self.aux = holder
        return self.conv(x) * self.aux.t


def test_a_tensor_of_a_module_the_forward_adds_is_read_by_its_path():
    """The tensor attributes are looked up in the live tree, not in a
    walk kept from before the trace."""
    from mmfuse.discovery.fx_tracer import trace_module_forward
    from mmfuse.module_walk import tree_unchanged, walk_modules
    model = _AddsAHolder().eval()
    with tree_unchanged():
        walk_modules(model)
        graph = trace_module_forward(model)
    assert [str(n.target) for n in graph.nodes
            if n.op == 'get_attr'] == ['aux.t']
