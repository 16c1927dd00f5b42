"""Safety: training mode, wrappers, idempotence, undo, and what a fused
model can still do (core issue, sections 5 and 6)."""
import contextlib
import copy
import io
import os
import socket
import subprocess
import sys
import weakref
from typing import Iterator, List

import pytest
import torch
import torch.distributed as dist
from torch import nn

import mmfuse
from mmfuse.demo import build_demo_model
from mmfuse.testing import randomize_norm_stats
from mmfuse.verify import output_error

from fusion_checks import (CoarseRounding, RaisesAfterNorm,
                           changed_where_marked, doubled_output, identity_at,
                           kept_at)


def _resnetish() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
        nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4))
    return randomize_norm_stats(model.eval())


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('with_inputs', [False, True])
def test_training_mode_is_refused_with_the_module_name(with_inputs):
    model = _resnetish()
    model[4].train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(mmfuse.FusionError, match="'4'.*BatchNorm2d.*eval"):
        mmfuse.fuse_model(model, (X, ) if with_inputs else None)
    with pytest.raises(mmfuse.FusionError, match='training mode'):
        mmfuse.fuse_conv_bn(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_model_without_foldable_norms_is_left_as_it_is_or_refused():
    """``fuse_conv_bn`` looks no further on a model with no norm a fold
    can take (GroupNorm, LayerNorm, a BN with batch statistics), and
    still refuses one in training mode, naming the module."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4),
                          nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4, track_running_stats=False),
                          nn.Sequential(nn.Conv2d(4, 4, 1),
                                        nn.LayerNorm(14))).eval()
    modules = list(model.modules())
    before = copy.deepcopy(model.state_dict())
    assert mmfuse.fuse_conv_bn(model) is model
    assert list(model.modules()) == modules
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model[4][1].train()
    with pytest.raises(mmfuse.FusionError, match="'4.1'.*LayerNorm"):
        mmfuse.fuse_conv_bn(model)
    # A foldable norm anywhere: the usual discovery.
    model[4][1].eval()
    model.add_module('5', nn.Conv2d(4, 4, 1))
    model.add_module('6', nn.BatchNorm2d(4))
    mmfuse.fuse_conv_bn(model.eval())
    identity_at(model, ['6'])
    kept_at(model, ['1', '3'])


def test_data_parallel_is_unwrapped():
    model = _resnetish()
    wrapped = nn.DataParallel(model)
    assert mmfuse.fuse_conv_bn(wrapped) is wrapped
    identity_at(model, ['1', '4'])  # Linear + BN1d: needs an input
    kept_at(model, ['9'])
    model = _resnetish()
    report = mmfuse.fuse_model(nn.DataParallel(model), (X, ))
    assert report.folded_names == ['1', '4', '9']


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_ddp_and_mmengine_wrappers_are_unwrapped():
    from mmengine.model import MMDistributedDataParallel
    dist.init_process_group(
        'gloo', init_method=f'tcp://127.0.0.1:{_free_port()}', rank=0,
        world_size=1)
    try:
        for wrapper in (nn.parallel.DistributedDataParallel,
                        MMDistributedDataParallel):
            model = _resnetish()
            with torch.no_grad():
                reference = model(X)
            report = mmfuse.fuse_model(wrapper(model), (X, ))
            assert report.folded_names == ['1', '4', '9']
            with torch.no_grad():
                assert output_error(reference, model(X))[1] < 1e-5
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('with_inputs', [False, True])
def test_second_call_folds_nothing_and_changes_nothing(with_inputs):
    model = build_demo_model()
    inputs = (torch.randn(2, 3, 32, 32), )
    first = mmfuse.fuse_model(model, inputs if with_inputs else None)
    assert first.folded
    state = copy.deepcopy(model.state_dict())
    structure = str(model)
    second = mmfuse.fuse_model(model, inputs if with_inputs else None)
    assert second.folded == []
    assert str(model) == structure
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert {s.name for s in second.left} == {s.name for s in first.left}


def test_discovery_changes_nothing():
    model = build_demo_model()
    state = copy.deepcopy(model.state_dict())
    for inputs in (None, (torch.randn(1, 3, 32, 32), )):
        plan = mmfuse.discover_folds(model, inputs)
        assert plan.folds
    assert all(torch.equal(state[k], v)
               for k, v in model.state_dict().items())
    assert not any(isinstance(m, nn.Identity) for m in model.modules())


def test_tied_weights_are_not_changed_behind_the_back():
    model = _resnetish()
    other = nn.Conv2d(8, 8, 3, stride=2, padding=1).eval()
    other.weight = model[3].weight
    model.add_module('other', other)
    before = other.weight.detach().clone()
    mmfuse.fuse_conv_bn(model)
    assert torch.equal(other.weight, before)


def _conv_bn_pair():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    randomize_norm_stats(model, seed=3)
    return model


@pytest.mark.parametrize('norm_first', [False, True])
def test_fuse_conv_bn_rewrites_an_unseen_weight_in_place(norm_first):
    """The weight nothing else refers to is rewritten where it lies (no
    new allocation); the result is the same as with a new weight.  So is
    the weight of a conv after its norm (no padding: exact)."""
    model = _conv_bn_pair()
    conv, norm = 0, 1
    if norm_first:
        model = randomize_norm_stats(
            nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3)).eval(), 3)
        conv, norm = 1, 0
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        expected = reference(x)
    weight_id = id(model[conv]._parameters['weight'])
    address = model[conv]._parameters['weight'].data_ptr()
    mmfuse.fuse_conv_bn(model)
    assert isinstance(model[norm], nn.Identity)
    assert id(model[conv].weight) == weight_id
    assert model[conv].weight.data_ptr() == address
    with torch.no_grad():
        assert output_error(expected, model(x))[1] < 1e-5
    # A view of the weight held elsewhere: a new weight, the view kept.
    held = _conv_bn_pair() if not norm_first else copy.deepcopy(reference)
    view = held[conv].weight.detach()[0]
    before = view.clone()
    mmfuse.fuse_conv_bn(held)
    assert isinstance(held[norm], nn.Identity)
    assert torch.equal(view, before)
    assert held[conv].weight.data_ptr() != view.data_ptr()


@pytest.mark.parametrize('holder', ['parameter', 'state_dict', 'view'])
def test_a_weight_seen_elsewhere_is_never_rewritten_in_place(holder):
    """A reference to the parameter, a ``state_dict()`` taken before, or a
    view of the weight keeps its values: the fold gets a new weight."""
    model = _conv_bn_pair()
    before = model[0].weight.detach().clone()
    held = {
        'parameter': lambda: model[0].weight,
        'state_dict': lambda: model.state_dict()['0.weight'],
        'view': lambda: model[0].weight.detach()[0],
    }[holder]()
    mmfuse.fuse_conv_bn(model)
    assert isinstance(model[1], nn.Identity)
    whole = held if holder != 'view' else held.unsqueeze(0)
    assert torch.equal(whole, before[:whole.shape[0]])
    assert not torch.equal(model[0].weight[:1], before[:1])


def test_a_traced_copy_of_the_model_keeps_computing_the_same():
    """``torch.jit.trace`` shares the weight tensor from C++ (no Python
    reference): it is not rewritten in place, and the traced copy, which
    still runs its BN, keeps its output."""
    model = _conv_bn_pair()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        expected = model(x)
        traced = torch.jit.trace(model, x)
    mmfuse.fuse_conv_bn(model)
    assert isinstance(model[1], nn.Identity)
    with torch.no_grad():
        assert torch.equal(traced(x), expected)
        assert output_error(expected, model(x))[1] < 1e-5


def test_a_weakly_referenced_or_expanded_weight_gets_a_new_one():
    """A weak reference may be looked through later, and an expanded
    weight has elements sharing memory: neither is rewritten in place."""
    watched = _conv_bn_pair()
    before = watched[0].weight.detach().clone()
    ref = weakref.ref(watched[0].weight)
    mmfuse.fuse_conv_bn(watched)
    # The old weight, if still alive, kept its values.
    assert ref() is not watched[0].weight
    assert ref() is None or torch.equal(ref(), before)
    assert not torch.equal(watched[0].weight, before)

    expanded = _conv_bn_pair()
    expanded[0].weight = nn.Parameter(
        torch.randn(1, 3, 3, 3).expand(8, 3, 3, 3))
    reference = copy.deepcopy(expanded)
    x = torch.randn(2, 3, 10, 10)
    mmfuse.fuse_conv_bn(expanded)
    assert isinstance(expanded[1], nn.Identity)
    with torch.no_grad():
        assert output_error(reference(x), expanded(x))[1] < 1e-5


def test_a_first_fold_in_inference_mode_leaves_later_folds_working():
    """The float64 scratch block is kept per thread: made under
    ``torch.inference_mode`` it must still take writes outside it."""
    script = ('import copy, torch, mmfuse\n'
              'from torch import nn\n'
              'from mmfuse.testing import randomize_norm_stats\n'
              'from mmfuse.verify import output_error\n'
              'def pair():\n'
              '    model = nn.Sequential(nn.Conv2d(3, 8, 3),'
              ' nn.BatchNorm2d(8)).eval()\n'
              '    randomize_norm_stats(model, seed=3)\n'
              '    return model\n'
              'with torch.inference_mode():\n'
              '    mmfuse.fuse_conv_bn(pair())\n'
              'model = pair()\n'
              'reference = copy.deepcopy(model)\n'
              'mmfuse.fuse_conv_bn(model)\n'
              'assert isinstance(model[1], nn.Identity)\n'
              'x = torch.randn(2, 3, 10, 10)\n'
              'with torch.no_grad():\n'
              '    assert output_error(reference(x), model(x))[1] < 1e-5\n'
              'print("ok")\n')
    result = subprocess.run([sys.executable, '-c', script],
                            capture_output=True,
                            text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                sys.path)),
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == 'ok'


def test_apply_plan_takes_any_iterable_of_folds():
    from mmfuse.surgery import apply_plan
    model = _conv_bn_pair()
    reference = copy.deepcopy(model)
    plan = mmfuse.discover_folds(model)
    applied = apply_plan(model, plan, iter(plan.folds))
    assert len(applied) == 1
    assert isinstance(model[1], nn.Identity)
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert output_error(reference(x), model(x))[1] < 1e-5


def test_verification_undoes_the_folds_it_finds_wrong():
    """A global forward hook doubles one conv's output: invisible to
    discovery, caught by verification, and only that fold is undone."""
    model = _resnetish()
    with doubled_output(model[3]):
        with torch.no_grad():
            reference = model(X)
        report = mmfuse.fuse_model(model, (X, ))
        with torch.no_grad():
            assert output_error(reference, model(X))[1] < 1e-5
    assert report.folded_names == ['1', '9']
    assert [s.name for s in report.undone] == ['4']
    assert 'verification' in report.undone[0].reason
    assert isinstance(model[4], nn.BatchNorm2d)
    assert report.max_rel_error < 1e-5


def test_fused_model_can_be_copied_saved_and_scripted(tmp_path):
    model = _resnetish()
    with torch.no_grad():
        reference = model(X)
    mmfuse.fuse_model(model, (X, ))
    clone = copy.deepcopy(model)
    path = tmp_path / 'fused.pth'
    torch.save(model.state_dict(), path)
    clone.load_state_dict(torch.load(path, weights_only=True))
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        for fused in (clone, scripted, loaded):
            assert output_error(reference, fused(X))[1] < 1e-5


def test_fused_model_can_be_compiled():
    model = _resnetish()
    with torch.no_grad():
        reference = model(X)
    mmfuse.fuse_model(model, (X, ))
    compiled = torch.compile(model, backend='aot_eager')
    with torch.no_grad():
        assert output_error(reference, compiled(X))[1] < 1e-5


def test_onnx_export_has_no_batch_normalization_node(tmp_path):
    onnx = pytest.importorskip('onnx', reason='onnx is in the full env')
    model = _resnetish()
    mmfuse.fuse_model(model, (X, ))
    path = os.fspath(tmp_path / 'fused.onnx')
    torch.onnx.export(model, (X, ), path, dynamo=False)
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert 'Conv' in ops and 'BatchNormalization' not in ops
    unfused = os.fspath(tmp_path / 'unfused.onnx')
    torch.onnx.export(_resnetish(), (X, ), unfused, dynamo=False,
                      do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE)
    ops = {node.op_type for node in onnx.load(unfused).graph.node}
    assert 'BatchNormalization' in ops


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    model = _resnetish()
    with torch.no_grad():
        reference = model.double()(X.double())
    half = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        _, unfused_rel = output_error(reference, half(X.to(dtype)))
    report = mmfuse.fuse_model(half, (X.to(dtype), ))
    assert report.folded_names == ['1', '4', '9']
    assert all(p.dtype == dtype for p in half.parameters())
    with torch.no_grad():
        _, fused_rel = output_error(reference, half(X.to(dtype)))
    # Folding in float64 costs no more than the half model's own rounding.
    assert fused_rel <= 2 * unfused_rel + 1e-3


def _deep_chain(depth: int = 24) -> nn.Module:
    """Conv-BN-ReLU layers with statistics taken on random images (as
    training leaves them) and random affine parameters: deep enough that
    bfloat16 rounding alone moves the output by far more than 5e-2."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
                   nn.ReLU()]
    model = nn.Sequential(*layers)
    from mmfuse.testing import randomize_norm_stats
    randomize_norm_stats(model, seed=0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 16, 16))
    return model.eval()


def test_low_precision_folds_are_judged_against_float32():
    """A bfloat16 model whose own rounding is larger than rtol keeps every
    fold that brings its output no further from the float32 one."""
    model = _deep_chain().to(torch.bfloat16)
    x = torch.randn(2, 3, 16, 16).to(torch.bfloat16)
    report = mmfuse.fuse_model(model, (x, ))
    assert report.yardstick == 'float32'
    assert report.unfused_precise_rel_error > report.rtol  # the premise
    assert not report.undone
    assert len(report.folded) == 24
    assert report.precise_rel_error <= 2 * report.unfused_precise_rel_error
    assert 'against float32' in report.summary()


def _coarse_chain() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), CoarseRounding(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), CoarseRounding(),
        nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8))
    return randomize_norm_stats(model.eval(), seed=0)


X_LARGE = torch.randn(4, 3, 32, 32,
                      generator=torch.Generator().manual_seed(1))


def test_float32_rounding_noise_is_judged_against_float64():
    """A float32 model whose own rounding exceeds rtol: exact folds move
    its output across grid points, by more than rtol, yet no further from
    the float64 output than the unfused model is; all are kept."""
    model = _coarse_chain()
    reference = copy.deepcopy(model)
    report = mmfuse.fuse_model(model, (X_LARGE, ))
    assert report.yardstick == 'float64'  # the plain check failed first
    assert report.unfused_precise_rel_error > report.rtol  # the premise
    assert report.max_rel_error > report.rtol
    assert report.folded_names == ['1', '4', '7'] and not report.undone
    assert report.precise_rel_error <= 2 * report.unfused_precise_rel_error
    assert 'against float64' in report.summary()
    with torch.no_grad():
        assert output_error(reference(X_LARGE), model(X_LARGE))[1] < 1e-2


def test_a_copy_that_computes_otherwise_is_no_yardstick():
    """A hook keyed to the model's own module does not reach its float64
    copy, which then lands far from the model's output: the plain
    tolerance alone judges, and says why."""
    model = _coarse_chain()
    with doubled_output(model[3]):
        report = mmfuse.fuse_model(model, (X_LARGE, ))
    assert report.yardstick.startswith('none: the float64 copy is ')
    assert report.precise_rel_error is None
    assert '4' in [s.name for s in report.undone]
    assert 'wider yardstick none' in report.summary()


def _rough_chain(offset: float = 1e5) -> nn.Module:
    """As :func:`_coarse_chain`, with a grid four times coarser: its float32
    output is further from float64 than any yardstick may be (1e-3).  (A
    bfloat16 one is, with ``offset`` 256, beyond what a float32 yardstick
    may be.)"""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16),
        CoarseRounding(offset), nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16), CoarseRounding(offset),
        nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8))
    return randomize_norm_stats(model.eval(), seed=0)


@contextlib.contextmanager
def float64_calls(cls: type) -> Iterator[List[nn.Module]]:
    """Within, the modules of class ``cls`` called on a float64 tensor
    are listed, once a call (a global forward pre-hook: copies too)."""
    calls: List[nn.Module] = []

    def note(module, args):
        if type(module) is cls and args and \
                isinstance(args[0], torch.Tensor) and \
                args[0].dtype == torch.float64:
            calls.append(module)

    handle = nn.modules.module.register_module_forward_pre_hook(note)
    try:
        yield calls
    finally:
        handle.remove()


def test_folds_of_a_model_too_rough_for_a_yardstick_are_judged_on_a_twin():
    """Too rough in float32 for the float64 yardstick, the model's folds
    are judged on a float64 twin, where exact folds change nothing: all
    kept (the plain check would undo exact folds for rounding noise).
    Two float64 passes: the yardstick's, and the fused twin's judged
    against it (the twin is not run unchanged)."""
    model = _rough_chain()
    reference = copy.deepcopy(model)
    with float64_calls(nn.Sequential) as passes:
        report = mmfuse.fuse_model(model, (X_LARGE, ))
    assert len(passes) == 2
    assert report.unfused_precise_rel_error > 1e-3  # the premise
    assert report.twin == 'float64' and report.yardstick == 'float64'
    assert report.folded_names == ['1', '4', '7'] and not report.undone
    assert report.precise_rel_error <= 2 * report.unfused_precise_rel_error
    assert 'folds judged on a float64 twin' in report.summary()
    with torch.no_grad():
        assert output_error(reference(X_LARGE), model(X_LARGE))[1] < 1e-2


def _fused_with_a_doubled_conv(model: nn.Module,
                               conv: nn.Module) -> 'mmfuse.FusionReport':
    """``fuse_model`` on ``model`` (on ``X_LARGE``) where ``conv``'s output
    is doubled (a copy's too), unseen by discovery, so that its fold is
    wrong; the fused output is checked to stay near the unfused one."""
    conv.doubled = True
    with changed_where_marked('doubled', lambda output: output * 2):
        with torch.no_grad():
            reference = model(X_LARGE)
        report = mmfuse.fuse_model(model, (X_LARGE, ))
        with torch.no_grad():
            assert output_error(reference, model(X_LARGE))[1] < 1e-2
    return report


@pytest.mark.parametrize('make, judge, reason', [
    (lambda: _coarse_chain(), 'yardstick', 'float64 output'),
    (lambda: _rough_chain(), 'twin', 'float64 twin by more than rtol'),
], ids=['yardstick', 'twin'])
def test_a_wrong_fold_in_a_noisy_model_is_found_and_only_it(
        make, judge, reason):
    """In a float32 model noisier than rtol, a fold that is wrong (its
    conv's output doubled before the norm, unseen by discovery, done by a
    copy too) is undone, and only it: against the float64 yardstick, or,
    in a model too rough for one, on the float64 twin."""
    model = make()
    report = _fused_with_a_doubled_conv(model, model[3])
    assert report.yardstick == 'float64'
    assert (report.twin == 'float64') == (judge == 'twin')
    assert report.folded_names == ['1', '7']
    assert [s.name for s in report.undone] == ['4']
    assert reason in report.undone[0].reason
    assert isinstance(model[4], nn.BatchNorm2d)


@pytest.mark.parametrize('keep', [False, True])
def test_a_refused_wider_output_is_kept_only_where_asked(keep):
    """The float64 output refused as a yardstick (too far from the
    model's) is kept for a twin to start from only where one may be made:
    else it would be held, unused, through a search on the model."""
    from mmfuse.verify import OutputCheck
    model = _rough_chain()
    with torch.no_grad():
        check = OutputCheck(model(X_LARGE), 1e-4)
    check.add_precise(model, (X_LARGE, ), keep_rough=keep)
    assert check.too_rough and check.precise is None  # the premise
    assert (check.rough is not None) == keep


class _DoubledInFloat64(nn.Module):
    """A rough chain whose output is doubled where the parameter of a
    layer it never calls is float64, read outside that layer's forward:
    so in a twin (all of it cast), not in the yardstick's copy (each
    layer cast only while it runs)."""

    def __init__(self):
        super().__init__()
        self.chain = _rough_chain()
        self.unused = nn.Linear(1, 1)

    def forward(self, x):
        output = self.chain(x)
        if self.unused.weight.dtype == torch.float64:
            return output * 2
        return output


def test_a_twin_that_computes_apart_from_the_yardstick_judges_on_its_own():
    """The fused twin fails against the yardstick's float64 output it
    starts from (twice it): the twin is run unchanged for its own output,
    against which the same fused output is judged again (not run again):
    the exact folds hold, and all are kept."""
    torch.manual_seed(0)
    model = _DoubledInFloat64().eval()
    with float64_calls(nn.Sequential) as passes:
        report = mmfuse.fuse_model(model, (X_LARGE, ))
    assert report.twin == 'float64'
    assert report.folded_names == ['chain.1', 'chain.4', 'chain.7']
    assert not report.undone
    # The yardstick; the fused twin against it; the twin unchanged.
    assert len(passes) == 3


class _NarrowOutput(nn.Module):
    """A rough chain whose output is cast to a narrower dtype at the end
    (``.float()``, as mmdet's FCOS head casts its box regression), as a
    tensor or a numpy array: so in a float64 twin too."""

    def __init__(self, cast):
        super().__init__()
        self.chain = _rough_chain()
        self.cast = cast

    def forward(self, x):
        return self.cast(self.chain(x))


_X_SMALL = torch.randn(1, 3, 1, 1, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize('cast, name, x', [
    (lambda y: y.float(), 'float32', X_LARGE),
    (lambda y: y.to(torch.bfloat16), 'bfloat16', _X_SMALL),
    (lambda y: y.half().numpy(), 'float16', X_LARGE),
], ids=['float32', 'bfloat16', 'numpy-float16'])
def test_no_twin_of_a_model_with_narrower_outputs(cast, name, x):
    """A twin whose outputs are rounded to a dtype narrower than its own
    (bfloat16: 4e-3) could hide a fold's error under that rounding (a
    wrong fold that scales a norm's output by 1 + 1e-3, ten times rtol,
    was kept so): no twin is made of it, a numpy array's dtype counted
    too, and the plain check judges; the wrong fold is undone."""
    model = _NarrowOutput(cast).eval()
    model.chain[7].scaled = True
    with changed_where_marked('scaled', lambda output: output * 1.001):
        report = mmfuse.fuse_model(model, (x, ))
    assert report.twin is None
    assert f'no twin: the float64 copy gave {name} outputs' in \
        report.yardstick
    assert 'chain.7' in [s.name for s in report.undone]


class _Float64Output(nn.Module):
    """A bfloat16 rough chain that returns its output in float64: wider
    than its float32 twin."""

    def __init__(self):
        super().__init__()
        self.chain = _rough_chain(offset=256.0)

    def forward(self, x):
        return self.chain(x).double()


def test_a_twin_with_wider_outputs_judges_the_folds():
    """A float64 output rounds no more than a float32 twin: the twin of a
    bfloat16 model that returns float64 is made, and finds the wrong fold
    (a conv whose output is doubled) by bisection there, undoing only
    it."""
    model = _Float64Output().to(torch.bfloat16).eval()
    x = X_LARGE.to(torch.bfloat16)
    model.chain[3].doubled = True
    with changed_where_marked('doubled', lambda output: output * 2):
        report = mmfuse.fuse_model(model, (x, ))
    assert report.twin == 'float32'
    assert [s.name for s in report.undone] == ['chain.4']
    assert report.folded_names == ['chain.1', 'chain.7']


class _CastToUnusedWeight(nn.Module):
    """A rough chain whose output is cast to the dtype of a layer it never
    calls, read outside that layer's forward: float32 in the yardstick's
    copy (each layer cast only while it runs), float64 in a twin."""

    def __init__(self):
        super().__init__()
        self.chain = _rough_chain()
        self.unused = nn.Linear(1, 1)

    def forward(self, x):
        return self.chain(x).to(self.unused.weight.dtype)


def test_a_twin_does_not_start_from_a_narrower_yardstick_output():
    """The yardstick's output is float32 where the twin's is float64: the
    twin does not judge against it (its rounding could hide a fold's
    error) but runs unchanged for its own, against which the exact folds
    hold: three float64 passes, all folds kept."""
    torch.manual_seed(0)
    model = _CastToUnusedWeight().eval()
    with float64_calls(nn.Sequential) as passes:
        report = mmfuse.fuse_model(model, (X_LARGE, ))
    assert report.twin == 'float64'
    assert report.folded_names == ['chain.1', 'chain.4', 'chain.7']
    assert not report.undone
    # The yardstick; the twin unchanged; the fused twin.
    assert len(passes) == 3


def test_no_twin_of_a_model_whose_copy_computes_otherwise():
    """A hook keyed to the model's own module does not reach a copy: the
    copy, run in float32, does not give the model's output, so no twin
    judges, and the plain tolerance undoes the wrong fold."""
    model = _rough_chain()
    with doubled_output(model[3]):
        report = mmfuse.fuse_model(model, (X_LARGE, ))
    assert report.twin is None
    assert 'no twin: a copy of the model computes otherwise' in \
        report.yardstick
    assert '4' in [s.name for s in report.undone]


class _NoisyAndClean(nn.Module):
    """Two outputs: one through coarse rounding (noisy in float32), one
    through a plain conv+BN (float32 rounding only)."""

    def __init__(self):
        super().__init__()
        self.noisy = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
            CoarseRounding(), nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8))
        self.clean = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                                   nn.BatchNorm2d(8))

    def forward(self, x):
        return self.noisy(x), self.clean(x)


def test_each_output_is_judged_against_its_own_rounding():
    """The noisy output's float32 rounding buys no slack for the clean
    one: a fold that moves the clean output by 3e-4 (relative; its own
    rounding is 1e-7) is undone, the noisy output's folds stay."""
    torch.manual_seed(0)
    model = randomize_norm_stats(_NoisyAndClean().eval(), seed=0)
    model.clean[0].shifted = True  # its fold is wrong, unseen by discovery
    with changed_where_marked('shifted', lambda output: output + 0.002):
        with torch.no_grad():
            reference = model(X_LARGE)
        report = mmfuse.fuse_model(model, (X_LARGE, ))
        with torch.no_grad():
            output = model(X_LARGE)
    assert report.yardstick == 'float64'
    # The premise: the noisy output's own error allows more than the
    # wrong fold's.
    assert 2 * report.unfused_precise_rel_error > 4e-4
    assert report.folded_names == ['noisy.1', 'noisy.4']
    assert [s.name for s in report.undone] == ['clean.1']
    assert output_error(reference[1], output[1])[1] < 1e-6


def test_a_low_precision_copy_that_computes_otherwise_is_no_yardstick():
    """bfloat16: the float32 copy that misses a hook keyed to the model's
    module lands too far from the model's output to be a yardstick (it
    would let the wrong fold through), so the wrong fold is undone."""
    torch.manual_seed(0)
    model = randomize_norm_stats(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8)).eval(), seed=0)
    model.to(torch.bfloat16)
    x = X_LARGE.to(torch.bfloat16)
    with doubled_output(model[3]):
        with torch.no_grad():
            reference = model(x)
        report = mmfuse.fuse_model(model, (x, ))
        with torch.no_grad():
            assert output_error(reference, model(x))[1] <= report.rtol
    assert report.yardstick.startswith('none: the float32 copy is ')
    assert '4' in [s.name for s in report.undone]


class _RootOfPositive(nn.Module):
    """Two outputs: a conv+BN, and the spatial mean of the square root of
    another conv+BN made positive by a hook on ``pos`` (the test's)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                               nn.BatchNorm2d(8))
        self.b = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                               nn.BatchNorm2d(8))
        self.pos = nn.Identity()

    def forward(self, x):
        root = torch.sqrt(self.pos(self.b(x)))
        return self.a(x), root.mean(dim=(2, 3))


def test_a_copy_that_is_nan_where_the_model_is_not_is_no_yardstick():
    """The float64 copy misses the hook keyed to the model's ``pos``, so
    its square roots are NaN where the model's are finite: were those
    places left out, the copy would pass any output there, and the wrong
    fold of ``b.1`` with it."""
    torch.manual_seed(0)
    model = randomize_norm_stats(_RootOfPositive().eval(), seed=0)
    target = model.pos
    model.b[0].doubled = True  # its fold is wrong, unseen by discovery

    def positive(module, args, output):
        return output.abs() + 1 if module is target else output

    handle = nn.modules.module.register_module_forward_hook(positive)
    try:
        with changed_where_marked('doubled', lambda output: output * 2):
            with torch.no_grad():
                reference = model(X_LARGE)
            report = mmfuse.fuse_model(model, (X_LARGE, ))
            with torch.no_grad():
                output = model(X_LARGE)
    finally:
        handle.remove()
    assert report.yardstick.startswith('none: the float64 copy')
    assert [s.name for s in report.undone] == ['b.1']
    assert report.folded_names == ['a.1']
    assert output_error(reference, output)[1] <= report.rtol


class _SpyScale(nn.Module):
    """Multiplies by a parameter and notes the dtype it saw it in; a deep
    copy of it is itself."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.seen = []

    def __deepcopy__(self, memo):
        return self

    def forward(self, x):
        self.seen.append(self.scale.dtype)
        return x * self.scale


def test_upcast_output_never_casts_a_module_it_shares_with_the_model():
    from mmfuse.verify import upcast_output
    spy = _SpyScale()
    model = nn.Sequential(nn.Conv2d(3, 3, 1), spy).eval()
    wide = upcast_output(model, (torch.randn(1, 3, 4, 4), ),
                         torch.float64)
    assert wide.dtype == torch.float64  # x * scale promotes
    assert spy.seen == [torch.float32]
    assert model[1] is spy and spy.scale.dtype == torch.float32


class _Tied(nn.Module):
    """A conv called twice, a BN, a buffer, a parameter shared by two
    modules, and a leaf that raises when asked to."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.other = nn.Conv2d(3, 3, 3, padding=1)
        self.other.weight = self.conv.weight
        self.register_buffer('offset', torch.full((1, 3, 1, 1), 0.5))
        self.fail = False

    def forward(self, x):
        y = self.bn(self.conv(self.conv(x))) + self.offset
        if self.fail:
            return self.other(y.float())  # float64 input, float64 weight
        return self.other(y)


def test_upcast_output_computes_wide_and_removes_its_hooks():
    """A conv called twice, a weight tied to another conv and a buffer all
    run in float64 (a float32 weight would make the conv raise); the
    global hooks it adds are gone afterwards, also when the forward
    raises."""
    from mmfuse.verify import upcast_output
    model = randomize_norm_stats(_Tied().eval(), seed=0)
    x = torch.randn(2, 3, 8, 8)
    hooks = (dict(nn.modules.module._global_forward_pre_hooks),
             dict(nn.modules.module._global_forward_hooks))
    with torch.no_grad():
        expected = model(x).double()
    wide = upcast_output(model, (x, ), torch.float64)
    assert wide.dtype == torch.float64
    assert output_error(wide, expected)[1] < 1e-5
    model.fail = True  # the copy's forward raises half way
    with pytest.raises(RuntimeError):
        upcast_output(model, (x, ), torch.float64)
    assert (dict(nn.modules.module._global_forward_pre_hooks),
            dict(nn.modules.module._global_forward_hooks)) == hooks
    assert model.other.weight is model.conv.weight


class _Float32Only(nn.Module):
    """Convolves with a float32 kernel made in forward: a float64 input
    fails there."""

    def forward(self, x):
        kernel = torch.ones(x.shape[1], 1, 1, 1, dtype=torch.float32)
        return nn.functional.conv2d(x, kernel, groups=x.shape[1])


def test_a_model_that_cannot_run_wider_keeps_the_plain_tolerance():
    model = _coarse_chain()
    model.append(_Float32Only().eval())
    # Only the failing check calls for the float64 copy.
    report = mmfuse.fuse_model(model, (X_LARGE, ))
    assert report.yardstick.startswith('none: the float64 copy of the '
                                       'model failed (RuntimeError')
    assert report.precise_rel_error is None
    assert report.max_rel_error <= report.rtol


def test_output_check_criteria():
    from mmfuse.verify import OutputCheck
    reference = torch.tensor([1.0, 2.0])
    # Relative errors are the largest absolute error over the largest
    # reference value (2.0 here).
    precise = torch.tensor([1.2, 2.0])  # the reference is 0.1 off
    plain = OutputCheck(reference, 0.05)
    assert plain(torch.tensor([1.05, 2.0]))
    assert not plain(torch.tensor([1.2, 2.0]))
    assert 'float32' not in plain.failure()
    low = OutputCheck(reference, 0.05, precise)
    assert low.own_error == pytest.approx(0.1)
    assert low(torch.tensor([1.2, 2.0]))  # closer to float32: fine
    assert low(torch.tensor([1.0, 2.0]))  # 0.1 off float32, as unfused
    assert low(torch.tensor([0.9, 2.0]))  # 0.15 off float32: within 2x
    assert not low(torch.tensor([0.6, 2.0]))  # 0.3 off float32: not
    assert 'float32' in low.failure()


def test_folded_weights_are_computed_in_float64():
    model = _resnetish()
    conv, bn = model[0], model[1]
    expected = conv.weight.double() * (
        bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    ).reshape(-1, 1, 1, 1)
    mmfuse.fuse_conv_bn(model)
    assert torch.equal(model[0].weight, expected.float())


@pytest.mark.parametrize('with_inputs', [False, True])
def test_undo_restores_the_exact_model(with_inputs):
    from mmfuse.surgery import apply_plan, undo_folds
    model = build_demo_model()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    structure = str(model)
    plan = mmfuse.discover_folds(model, (x, ) if with_inputs else None)
    applied = apply_plan(model, plan)
    assert str(model) != structure
    undo_folds(applied)
    assert str(model) == structure
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(torch.cat([t.flatten() for t in
                                      torch.utils._pytree.tree_leaves(
                                          model(x))]),
                           torch.cat([t.flatten() for t in
                                      torch.utils._pytree.tree_leaves(
                                          reference)]))


def test_a_model_whose_output_is_not_reproducible_keeps_nothing():

    class Noisy(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + torch.rand(1)

    model = randomize_norm_stats(Noisy().eval())
    report = mmfuse.fuse_model(model, (X, ))
    assert report.folded == []
    assert [s.name for s in report.undone] == ['bn']
    assert isinstance(model.bn, nn.BatchNorm2d)


def test_folds_applied_without_undo_cannot_be_undone():
    from mmfuse.discovery import collect_structural_evidence, plan_folds
    from mmfuse.surgery import apply_plan
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    plan = plan_folds(model, collect_structural_evidence(model))
    applied = apply_plan(model, plan, undoable=False)
    assert len(applied) == 1 and isinstance(model[1], nn.Identity)
    with pytest.raises(RuntimeError, match='without keeping'):
        applied[0].undo()


def test_output_check_ignores_an_overflowing_yardstick():
    """A half-precision unfused output that overflows tells nothing about a
    fold: only the plain tolerance counts then."""
    from mmfuse.verify import OutputCheck
    precise = torch.tensor([1.0, 70000.0, 3.0])
    reference = precise.half()  # 70000 overflows to inf
    check = OutputCheck(reference, 0.05, precise)
    assert check.own_error == float('inf')
    assert not check(torch.tensor([float('nan'), 1.0, 3.0]).half())
    assert not check(torch.zeros(2).half())
    assert check(reference.clone())


class _AppliedItems:
    """Items applied to a list (``state``), for ``isolate_failures``."""

    def __init__(self):
        self.state = []

    def apply(self, items):
        self.state.extend(items)
        return list(items)

    def undo(self, applied):
        for item in reversed(applied):
            self.state.remove(item)


def test_isolate_failures_keeps_nothing_when_the_kept_set_fails():
    """A check that disagrees with itself (an output that is not
    reproducible): the set the bisection kept, last checked with one more
    item, fails once more on its own, so it is undone and reported as
    dropped."""
    from mmfuse.verify import isolate_failures
    items = _AppliedItems()
    state, apply, undo = items.state, items.apply, items.undo
    # (abc fails: the caller's word) a passes; bc fails; b passes; c
    # fails; then a+b, which passed before, fails; nothing passes.
    answers = iter([True, False, True, False, False, True])
    kept, bad, dropped, unchecked = isolate_failures(
        ['a', 'b', 'c'], apply, undo, lambda: next(answers))
    assert (kept, bad, dropped, unchecked, state) == ([], ['c'], ['a', 'b'],
                                                      [], [])
    assert next(answers, None) is None
    # A reproducible check finds the bad item and keeps the rest, from
    # the halves (the whole set is not checked again) and with no check
    # repeating the last one on the same state.
    calls = []
    kept, bad, dropped, unchecked = isolate_failures(
        ['a', 'b', 'c'], apply, undo,
        lambda: calls.append(list(state)) or 'b' not in state)
    assert (kept, bad, dropped + unchecked,
            state) == (['a', 'c'], ['b'], [], ['a', 'c'])
    assert calls == [['a'], ['a', 'b', 'c'], ['a', 'b'], ['a', 'c']]
    # One item that fails with nothing else applied: found with no
    # check but the last, of the state without it.
    state.clear()
    calls = []
    assert isolate_failures(
        ['a'], apply, undo,
        lambda: calls.append(list(state)) or True) == ([], ['a'], [], [])
    assert calls == [[]]


def test_isolate_failures_stops_after_its_checks():
    """Where most items fail (an output that jumps with the rounding of
    any change), the search stops after the checks it may make: the items
    it did not reach stay unapplied and are returned as unchecked; with
    enough checks for the bad items it finds what an unbounded search
    finds."""
    from mmfuse.verify import isolate_failures, search_checks
    applied = _AppliedItems()
    state, apply, undo = applied.state, applied.apply, applied.undo
    items = list(range(32))
    calls = []
    found = isolate_failures(
        items, apply, undo,
        lambda: calls.append(list(state)) or not state, max_checks=10)
    # Ten checks in the search (every state with an item fails), then the
    # one of what stays (nothing): each failing half is split until one
    # item is left, found bad without a check of its own.
    assert len(calls) == 11 and calls[-1] == []
    assert found.kept == [] and found.dropped == [] and state == []
    assert found.bad and found.unchecked
    assert sorted(found.bad + found.unchecked) == items
    # An unbounded search checks every item (63 checks: a check per half).
    calls.clear()
    assert isolate_failures(
        items, apply, undo,
        lambda: calls.append(list(state)) or not state).bad == items
    assert len(calls) == 63
    # Two bad items among 100: the default number of checks finds both.
    for bad in ([3, 71], [50, 51]):
        items = list(range(100))
        calls.clear()
        state.clear()
        found = isolate_failures(
            items, apply, undo,
            lambda: calls.append(list(state)) or not set(bad) & set(state),
            max_checks=search_checks(len(items)))
        assert found.bad == bad and found.unchecked == []
        assert sorted(found.kept) == sorted(set(items) - set(bad))
        assert sorted(state) == found.kept
        assert len(calls) <= search_checks(len(items))


def test_walks_of_an_unchanged_tree_are_made_once_and_handed_out_as_copies():
    from mmfuse.module_walk import tree_unchanged, walk_modules
    model = _resnetish()
    with tree_unchanged():
        first = walk_modules(model)
        first.clear()  # a copy: the next caller still gets every module
        again = walk_modules(model)
        assert again == walk_modules(model)
        assert walk_modules(model, remove_duplicate=False) == list(
            model.named_modules(remove_duplicate=False))
    assert again == list(model.named_modules())
    # Outside, a changed tree is walked afresh.
    model.add_module('extra', nn.ReLU())
    assert walk_modules(model)[-1][0] == 'extra'


def test_walks_with_shared_modules_match_named_modules_in_either_order():
    """Within ``tree_unchanged`` the walk without duplicates is taken from
    the one with them: a module (and all below it) registered again under
    another path, deeper or shallower, comes only at its first path."""
    from mmfuse.module_walk import tree_unchanged, walk_modules
    inner = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU())
    middle = nn.Sequential(inner, nn.Linear(1, 1), inner)
    model = nn.Sequential(middle, inner, nn.Sequential(middle, inner))
    model.extra = inner[0]

    def ids(walk):
        return [(path, id(module)) for path, module in walk]

    expected = {
        flag: ids(model.named_modules(remove_duplicate=flag))
        for flag in (True, False)
    }
    assert len(expected[True]) < len(expected[False])
    for order in ((True, False), (False, True)):
        with tree_unchanged():
            for flag in order + order:
                assert ids(walk_modules(model, flag)) == expected[flag]
        for flag in order:
            assert ids(walk_modules(model, flag)) == expected[flag]


def test_find_submodule_goes_by_registered_names():
    from mmfuse.module_walk import find_submodule
    model = _resnetish()
    for path, module in model.named_modules():
        assert find_submodule(model, path) is module
    with pytest.raises(AttributeError, match="'layer1.nope'"):
        find_submodule(model, 'layer1.nope')
    # A module that is only a property (mmcv's ConvModule.norm) is not at
    # a registered path.
    from mmcv.cnn import ConvModule
    block = ConvModule(4, 4, 3, norm_cfg=dict(type='BN'))
    assert find_submodule(block, 'bn') is block.norm
    with pytest.raises(AttributeError, match="'norm'"):
        find_submodule(block, 'norm')


def test_a_forward_that_raises_in_a_leaf_leaves_no_hook_or_mode():
    model = RaisesAfterNorm(catch=False).eval()
    x = torch.randn(1, 8, 4, 4)
    modes = torch._C._len_torch_function_stack()
    with pytest.raises(ValueError, match='leaf failed'):
        mmfuse.fuse_model(model, (x, ))
    assert torch._C._len_torch_function_stack() == modes
    assert not nn.modules.module._global_forward_hooks
    assert not nn.modules.module._global_forward_pre_hooks
    assert isinstance(model.bn, nn.BatchNorm2d)
    # The model still runs, recorded by nothing.
    model.fails = nn.Identity()
    with torch.no_grad():
        model(x)


def test_a_fold_that_breaks_the_forward_is_undone_not_raised():
    """A forward that reads a plain attribute of its norm (no tensor:
    discovery does not see it): folded (an Identity has none), it raises;
    verification counts that as a failure and undoes the fold, and the
    model comes out as it was."""

    class ReadsNorm(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) / self.bn.num_features

    model = randomize_norm_stats(ReadsNorm().eval(), 0)
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    report = mmfuse.fuse_model(model, (x, ), reparameterize=False)
    assert report.folded == [] and [s.name for s in report.undone] == ['bn']
    assert isinstance(model.bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


class _UnderflowingBranches(nn.Module):
    """``n`` conv-norm branches, each an output; in float16 the folds of the
    ``underflowing`` ones lose their precision (a weight of 1e-3 scaled by
    1e-4 is a subnormal, 19 % off), while the unfused branches, whose input
    is large, do not.  Counts its forward passes."""

    def __init__(self, n: int, underflowing: set):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(1, 1, 1, bias=False) for _ in range(n))
        self.bns = nn.ModuleList(nn.BatchNorm2d(1) for _ in range(n))
        with torch.no_grad():
            for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
                small = i in underflowing
                conv.weight.fill_(1e-3 if small else 1.0)
                bn.weight.fill_(2e-4 if small else 2.0)
                bn.running_mean.fill_(0.0 if small else 0.5)
                bn.running_var.fill_(4.0)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return [bn(conv(x)) for conv, bn in zip(self.convs, self.bns)]


def test_search_for_failing_folds_stops_after_its_checks():
    """Where most folds fail verification (here float16 precision lost to
    subnormal weights; also an output that jumps with rounding, as mmdet's
    decoupled SOLO's point NMS does), finding each would take a forward
    pass per fold: the search stops after ``search_checks`` passes, and
    the folds it did not reach stay undone, each with its reason.  The
    model stays right."""
    from mmfuse.verify import search_checks
    n = 48
    underflowing = set(range(0, n, 2)) | {1, 3, 5}
    model = _UnderflowingBranches(n, underflowing).half().eval()
    x = torch.full((1, 1, 2, 2), 1e3).half()
    with torch.no_grad():
        reference = [y.clone() for y in model(x)]
    model.calls = 0
    report = mmfuse.fuse_model(model, (x, ), reparameterize=False)
    # The traced pass, the check of every fold, the wider check, then the
    # search, and the check of what stays (96 passes without a limit).
    assert model.calls <= 3 + search_checks(n) + 1
    reasons = {s.name: s.reason for s in report.undone}
    not_reached = [name for name, reason in reasons.items()
                   if reason.startswith('undone: not checked: the search')]
    found = [name for name, reason in reasons.items()
             if reason.startswith('undone: verification found')]
    assert not_reached and found
    folded = {f.norm for f in report.folded}
    assert folded and len(folded) + len(reasons) == n
    assert all(int(name.split('.')[1]) in underflowing for name in found)
    assert not any(int(name.split('.')[1]) in underflowing
                   for name in folded)
    with torch.no_grad():
        assert output_error(reference, model(x))[1] <= report.rtol
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == \
        len(reasons)


def _overflowing_half_model(pre: bool) -> nn.Module:
    """A float16 model whose first norm, folded into its conv, takes a
    weight of 100 past 65504 (scale 1000), while the unfused model, on a
    small input, stays finite; ``pre``: that norm runs before the conv
    (a 1x1 conv without padding, where a fold before it is exact)."""
    torch.manual_seed(0)
    if pre:
        model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1),
                              nn.ReLU(), nn.Conv2d(4, 4, 3),
                              nn.BatchNorm2d(4))
        norm, conv = model[0], model[1]
    else:
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),
                              nn.ReLU(), nn.Conv2d(4, 4, 3),
                              nn.BatchNorm2d(4))
        norm, conv = model[1], model[0]
    randomize_norm_stats(model, seed=1)
    with torch.no_grad():
        conv.weight.fill_(100.0)
        norm.weight.fill_(1e3)
        norm.running_var.fill_(1.0)
        norm.running_mean.zero_()
    return model.half().eval()


@pytest.mark.parametrize('pre', [False, True], ids=['after', 'before'])
def test_fold_that_would_overflow_float16_is_left_with_its_reason(pre):
    """A folded float16 weight past 65504 is inf: mmcv's fold (and, before
    this check, ``fuse_conv_bn``'s) gave an output of inf and nan.  The
    planner computes such a fold first and leaves the norm, naming the
    conv and the dtype; the other norm folds."""
    model = _overflowing_half_model(pre)
    x = (torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
         * 1e-3).half()
    with torch.no_grad():
        reference = model(x)
    assert torch.isfinite(reference).all()
    norm_name, conv_name = ('0', '1') if pre else ('1', '0')
    fused = mmfuse.fuse_conv_bn(copy.deepcopy(model))
    assert isinstance(fused[int(norm_name)], nn.BatchNorm2d)
    assert isinstance(fused[4], nn.Identity)
    with torch.no_grad():
        output = fused(x)
    assert torch.isfinite(output).all()
    assert output_error(reference, output)[1] <= 5e-2
    traced = copy.deepcopy(model)
    report = mmfuse.fuse_model(traced, (x, ))
    assert [f.norm for f in report.folded] == ['4'] and not report.undone
    reason = dict((s.name, s.reason) for s in report.left)[norm_name]
    assert reason == (f'folding it would take the weight of {conv_name} '
                      'out of the range of float16 (past 65504)')
    # In float32 the same fold fits.
    wide = _overflowing_half_model(pre).float()
    assert len(mmfuse.fuse_model(wide, (x.float(), )).folded) == 2


def test_folds_on_both_sides_of_a_float16_conv_are_checked_together():
    """A conv takes a norm before it and one after it: each fold alone
    keeps its float16 weight in range (100 x 20, 100 x 40), both together
    do not (80000), as surgery applies them in turn.  The second norm
    planned is left, with both folds named; a conv that already holds an
    inf is not the fold's doing, and its fold is not refused."""
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1),
                          nn.BatchNorm2d(4))
    randomize_norm_stats(model, seed=2)
    with torch.no_grad():
        model[1].weight.fill_(100.0)
        for bn, gamma in ((model[0], 20.0), (model[2], 40.0)):
            bn.weight.fill_(gamma)
            bn.running_var.fill_(1.0)
            bn.running_mean.zero_()
    model = model.half().eval()
    x = (torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
         * 1e-3).half()
    with torch.no_grad():
        reference = model(x)
    assert torch.isfinite(reference).all()
    fused = mmfuse.fuse_conv_bn(copy.deepcopy(model))
    assert [type(m) for m in fused] == [nn.BatchNorm2d, nn.Conv2d,
                                        nn.Identity]
    with torch.no_grad():
        output = fused(x)
    assert output_error(reference, output)[1] <= 5e-2
    report = mmfuse.fuse_model(copy.deepcopy(model), (x, ))
    assert [f.norm for f in report.folded] == ['2'] and not report.undone
    assert [(s.name, s.reason) for s in report.left] == [
        ('0', 'folding it would take the weight of 1 (which also takes a '
         'norm on its other side) out of the range of float16 (past '
         '65504)')]
    # Each alone fits: either one folds where the other is not there.
    for keep in (0, 2):
        single = nn.Sequential(*[copy.deepcopy(m) for i, m in
                                 enumerate(model) if i in (keep, 1)]).eval()
        assert len(mmfuse.fuse_model(single, (x, )).folded) == 1
    # An inf already in the conv is not the fold's doing: a norm before
    # it with a small scale and a shift (whose fold sums the weights
    # times the shift into the bias) is not refused for it.
    small = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1))
    randomize_norm_stats(small, seed=3)
    with torch.no_grad():
        small[1].weight[0, 0] = float('inf')
    plan = mmfuse.discover_folds(small.half().eval())
    assert [f.norm for f in plan.folds] == ['0'] and not plan.skipped


@pytest.mark.parametrize('where', ['conv', 'norm'])
def test_a_value_already_not_finite_does_not_excuse_an_overflow(where):
    """One inf in the conv's weight (or a nan in the norm's statistics)
    is not the fold's doing, and neither excuses the fold's own overflow
    in the other channels: the norm is still left, and ``fuse_conv_bn``
    keeps those channels finite."""
    model = _overflowing_half_model(pre=False)
    with torch.no_grad():
        if where == 'conv':
            model[0].weight[0, 0] = float('inf')
        else:
            model[1].running_var[0] = float('nan')
    x = (torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
         * 1e-3).half()
    plan = mmfuse.discover_folds(model)
    assert '1' in {s.name for s in plan.skipped
                   if 'out of the range of float16' in s.reason}
    fused = mmfuse.fuse_conv_bn(copy.deepcopy(model))
    assert isinstance(fused[1], nn.BatchNorm2d)
    assert isinstance(fused[4], nn.Identity)  # the other norm folds
    with torch.no_grad():
        # The layers left as they were compute what they did, nan and
        # inf where the unfused model has them.
        torch.testing.assert_close(fused[:2](x), model[:2](x), rtol=0,
                                   atol=0, equal_nan=True)
        unfused, output = model(x), fused(x)
    assert torch.isfinite(model[:2](x)[:, 1:]).all()
    assert torch.equal(torch.isfinite(unfused), torch.isfinite(output))


class _InterruptedOnItsSecondCall(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        _CALLS.append(1)
        if len(_CALLS) == 2:
            raise KeyboardInterrupt
        return self.bn(self.conv(x))


_CALLS = []


def test_a_fusion_that_raises_after_its_changes_puts_them_back():
    """Ctrl-C during the verification pass (or any error out of it) left
    the folds in the model."""
    _CALLS.clear()
    model = randomize_norm_stats(_InterruptedOnItsSecondCall().eval())
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(KeyboardInterrupt):
        mmfuse.fuse_model(model, (x, ))
    assert isinstance(model.bn, nn.BatchNorm2d)
    assert model.conv.bias is not None
    _CALLS.clear()
    with torch.no_grad():
        assert torch.equal(reference.conv.weight, model.conv.weight)
        assert torch.equal(reference.conv.bias, model.conv.bias)
