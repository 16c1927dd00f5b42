"""Layers an example input does not run (an mmseg segmentor's auxiliary
heads, run only in its training step): ``fuse_model`` folds them where
structure proves the data flow, as ``fuse_conv_bn`` does, and only where
the traced pass called neither the norm nor its conv."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmfuse
from fusion_checks import changed_where_marked, identity_at, kept_at
from mmfuse.discovery.planner import NOT_CALLED
from mmfuse.plan import NOT_RUN
from mmfuse.testing import randomize_norm_stats
from mmfuse.verify import output_error

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def conv_bn(channels: int = 8) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


class AuxHead(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Segmentor(nn.Module):
    """The auxiliary head runs in ``'loss'`` mode only (the list branch is
    an mmseg segmentor's: never taken for a single head)."""

    def __init__(self):
        super().__init__()
        self.backbone = conv_bn(3)
        self.aux = AuxHead()
        self.aux_seq = conv_bn()

    def forward(self, x, mode='tensor'):
        y = self.backbone(x)
        if mode == 'tensor':
            return y
        if isinstance(self.aux, nn.ModuleList):
            return tuple(head(y) for head in self.aux)
        return self.aux(y) + self.aux_seq(y)


def conv_also_run() -> nn.Module:
    """The auxiliary head's conv also runs in tensor mode, without its
    norm, from a forward hook on the model (structure does not read
    hooks): folding the norm into it would change the output."""
    model = Segmentor()

    def hook(module, args, output):
        return module.aux.conv(output) if args[1:] in ((), ('tensor', )) \
            else output

    model.register_forward_hook(hook)
    return model


def _fused(model: nn.Module, **options) -> mmfuse.FusionReport:
    return mmfuse.fuse_model(model, (X, ), **options)


def test_layers_the_input_does_not_run_fold_from_structure():
    model = randomize_norm_stats(Segmentor().eval(), seed=1)
    fused = copy.deepcopy(model)
    report = _fused(fused)
    # (In model order.)
    assert report.folded_names == ['backbone.1', 'aux.bn', 'aux_seq.1']
    assert not report.left
    evidence = {fold.norm: fold.evidence for fold in report.folded}
    assert evidence['aux.bn'].endswith(NOT_RUN)
    assert evidence['aux_seq.1'] == f'sequential; {NOT_RUN}'
    assert NOT_RUN not in evidence['backbone.1']
    identity_at(fused, ['aux.bn', 'aux_seq.1', 'backbone.1'])
    with torch.no_grad():
        # The mode the example input did not run gives the same output.
        assert output_error(model(X, 'loss'), fused(X, 'loss'))[1] < 1e-5


def test_layers_not_run_fold_only_where_an_output_check_runs():
    # The check is what shows that code which runs does not read them.
    model = randomize_norm_stats(Segmentor().eval(), seed=1)
    report = _fused(copy.deepcopy(model), verify=False)
    assert report.folded_names == ['backbone.1']
    plan = mmfuse.discover_folds(model, (X, ))
    assert [fold.norm for fold in plan.folds] == ['backbone.1']
    assert {skip.name: skip.reason for skip in plan.skipped} == {
        'aux.bn': NOT_CALLED, 'aux_seq.1': NOT_CALLED}


class ReadHead(AuxHead):

    def normalised(self):
        return isinstance(self.bn, nn.BatchNorm2d)

    def norm_channels(self):
        return self.bn.weight.shape[0]


class ReadsTheNormNotRun(nn.Module):
    """The mode the example input runs reads the head's norm through a
    method of the head, without calling it (no use the pass records)."""

    def __init__(self, read: str):
        super().__init__()
        self.backbone = conv_bn(3)
        self.aux = ReadHead()
        self.read = read

    def forward(self, x, mode='tensor'):
        y = self.backbone(x)
        if mode == 'loss':
            return self.aux(y)
        if self.read == 'type':
            return y * 2 if self.aux.normalised() else y
        return y[:, :self.aux.norm_channels()]


def reads_in_a_hook() -> nn.Module:
    """The same read, from a forward hook (structure does not read
    hooks)."""
    model = Segmentor()

    def hook(module, args, output):
        normalised = isinstance(module.aux.bn, nn.BatchNorm2d)
        return output * 2 if normalised else output

    model.register_forward_hook(hook)
    return model


@pytest.mark.parametrize('read', ['type', 'size'])
def test_a_norm_not_run_that_a_method_reads_stays(read):
    # Its fold changed the checked output by 0.5, or made it raise
    # (folded after the check); structure alone also folded it.
    model = randomize_norm_stats(ReadsTheNormNotRun(read).eval(), seed=1)
    fused = copy.deepcopy(model)
    report = _fused(fused)
    assert report.folded_names == ['backbone.1']
    reason = report.left[0].reason
    assert reason.startswith(f'{NOT_CALLED}; from structure:')
    assert 'ReadHead.norm' in reason or 'ReadHead.normalised' in reason
    kept_at(fused, ['aux.bn'])
    kept_at(mmfuse.fuse_conv_bn(copy.deepcopy(model)), ['aux.bn'])
    with torch.no_grad():
        for mode in ('tensor', 'loss'):
            assert output_error(model(X, mode), fused(X, mode))[1] < 1e-5


def test_a_fold_not_run_that_changes_the_checked_output_is_undone():
    model = randomize_norm_stats(reads_in_a_hook().eval(), seed=1)
    fused = copy.deepcopy(model)
    report = _fused(fused)
    assert [skip.name for skip in report.undone] == ['aux.bn']
    assert report.folded_names == ['backbone.1', 'aux_seq.1']
    kept_at(fused, ['aux.bn'])
    with torch.no_grad():
        for mode in ('tensor', 'loss'):
            assert output_error(model(X, mode), fused(X, mode))[1] < 1e-5


class ShallowCopy(nn.Module):
    """Two conv modules share one table of parameters (``copy.copy``):
    the one that runs in tensor mode has no norm after it."""

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(3, 8, 3, padding=1)
        self.backbone = nn.Sequential(conv, nn.ReLU())
        self.aux = nn.Sequential(copy.copy(conv), nn.BatchNorm2d(8))

    def forward(self, x, mode='tensor'):
        return self.backbone(x) if mode == 'tensor' else self.aux(x)


@pytest.mark.parametrize('traced', [True, False])
def test_a_conv_sharing_its_parameter_table_is_not_folded_into(traced):
    # Its fold wrote into the table of both (tensor mode off by 1.3).
    model = randomize_norm_stats(ShallowCopy().eval(), seed=1)
    fused = copy.deepcopy(model)
    assert fused.backbone[0]._parameters is fused.aux[0]._parameters
    if traced:
        report = _fused(fused)
    else:
        report = mmfuse.fuse_model(fused)
    assert not report.folded
    assert 'shares its table of parameters' in report.left[0].reason
    kept_at(fused, ['aux.1'])
    with torch.no_grad():
        for mode in ('tensor', 'loss'):
            assert output_error(model(X, mode), fused(X, mode))[1] < 1e-5


def test_a_norm_not_run_stays_where_its_conv_was_run():
    model = randomize_norm_stats(conv_also_run().eval(), seed=1)
    fused = copy.deepcopy(model)
    report = _fused(fused)
    assert not report.undone  # left, not folded and then undone
    left = {skip.name: skip.reason for skip in report.left}
    assert left['aux.bn'] == f'{NOT_CALLED}, but its conv aux.conv was'
    kept_at(fused, ['aux.bn'])
    identity_at(fused, ['aux_seq.1'])
    # (Structure alone folds it: what the trace adds.)
    identity_at(mmfuse.fuse_conv_bn(copy.deepcopy(model)), ['aux.bn'])
    with torch.no_grad():
        for mode in ('tensor', 'loss'):
            assert output_error(model(X, mode), fused(X, mode))[1] < 1e-5


def test_layers_not_run_stay_under_global_hooks():
    # A global hook may act on the layers when they do run; nothing would
    # judge their folds.
    model = randomize_norm_stats(Segmentor().eval(), seed=1)
    with changed_where_marked('never_marked', lambda output: output):
        report = _fused(copy.deepcopy(model))
    assert report.folded_names == ['backbone.1']
    left = {skip.name: skip.reason for skip in report.left}
    assert left == {'aux.bn': NOT_CALLED, 'aux_seq.1': NOT_CALLED}


def test_fold_not_run_false_leaves_them():
    model = randomize_norm_stats(Segmentor().eval(), seed=1)
    fused = copy.deepcopy(model)
    report = _fused(fused, fold_not_run=False)
    assert report.folded_names == ['backbone.1']
    left = {skip.name: skip.reason for skip in report.left}
    assert left == {'aux.bn': NOT_CALLED, 'aux_seq.1': NOT_CALLED}
    kept_at(fused, ['aux.bn', 'aux_seq.1'])


class UsesConv(nn.Module):

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x) * 2


class SharedNotRun(nn.Module):
    """Two heads the example input does not run share a conv: one runs
    it before its norm, the other without."""

    def __init__(self):
        super().__init__()
        self.backbone = conv_bn(3)
        conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Sequential(conv, nn.BatchNorm2d(8))
        self.plain = UsesConv(conv)

    def forward(self, x, mode='tensor'):
        y = self.backbone(x)
        if mode == 'tensor':
            return y
        return self.head(y) + self.plain(y)


def test_a_conv_shared_by_layers_not_run_is_seen_whole():
    # Structure is read for the norms not run alone; the other calls of
    # their convs still count: as with structure alone, the norm stays.
    model = randomize_norm_stats(SharedNotRun().eval(), seed=1)
    fused = copy.deepcopy(model)
    report = _fused(fused)
    assert report.folded_names == ['backbone.1']
    assert report.left[0].reason.startswith(f'{NOT_CALLED}; from structure:')
    kept_at(fused, ['head.1'])
    kept_at(mmfuse.fuse_conv_bn(copy.deepcopy(model)), ['head.1'])
    with torch.no_grad():
        assert output_error(model(X, 'loss'), fused(X, 'loss'))[1] < 1e-5
