"""The real patterns naive fusion gets wrong (core issue, section 4)."""
import copy

import pytest
import torch
from mmcv.cnn import ConvModule
from torch import nn

import mmfuse
from mmfuse.demo import (ActThenNorm, Bottleneck, ConcatNorm, SharedConvHead,
                         SumNorm, build_demo_model)
from mmfuse.testing import randomize_norm_stats
from mmfuse.verify import output_error

from fusion_checks import (RaisesAfterNorm, fuse_and_compare, identity_at,
                           kept_at)

X = torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('order', [('conv', 'norm', 'act'),
                                   ('conv', 'act', 'norm'),
                                   ('norm', 'conv', 'act'),
                                   ('act', 'conv', 'norm'),
                                   ('norm', 'act', 'conv'),
                                   ('act', 'norm', 'conv')])
@pytest.mark.parametrize('padding', [0, 1])
def test_a_conv_module_every_order(order, padding, traced):
    block = ConvModule(8, 8, 3, padding=padding, norm_cfg=dict(type='BN'),
                       order=order)
    fused, _, rel = fuse_and_compare(block, (X, ), traced)
    assert rel < 1e-5
    norm_after_conv = order.index('norm') == order.index('conv') + 1
    norm_right_before = order.index('conv') == order.index('norm') + 1
    if norm_after_conv or (norm_right_before and padding == 0):
        identity_at(fused, ['bn'])
    else:
        kept_at(fused, ['bn'])


def test_a_conv_module_reflect_padding_keeps_norm_before(traced):
    # ConvModule pads explicitly with a padding layer before the conv.
    block = ConvModule(8, 8, 3, padding=1, norm_cfg=dict(type='BN'),
                       order=('norm', 'conv', 'act'),
                       padding_mode='reflect')
    fused, _, rel = fuse_and_compare(block, (X, ), traced)
    assert rel < 1e-5
    kept_at(fused, ['bn'])


def test_a_norm_before_non_zero_padded_conv_folds(traced):
    model = nn.Sequential(
        nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1,
                                     padding_mode='replicate'))
    fused, _, rel = fuse_and_compare(model, (X, ), traced)
    assert rel < 1e-5
    identity_at(fused, ['0'])


def test_b_conv_act_norm_stays(traced):
    fused, report, rel = fuse_and_compare(ActThenNorm(8), (X, ), traced)
    assert rel < 1e-5
    kept_at(fused, ['bn'])
    if report is not None:
        assert [s.name for s in report.left] == ['bn']
        assert 'relu' in report.left[0].reason


def test_c_registration_order_is_not_evidence(traced):
    fused, report, rel = fuse_and_compare(Bottleneck(8), (X, ), traced)
    assert rel < 1e-5
    identity_at(fused, ['bn1', 'bn2'])
    kept_at(fused, ['bn3'])  # conv3's output is also used by the sum
    if report is not None:
        assert {f.norm: f.convs[0].name for f in report.folded} == {
            'bn1': 'conv1', 'bn2': 'conv2'}


def test_c_mmcv_registration_order_corrupts():
    """The incumbent is wrong on this block: the point of mmfuse."""
    from mmcv.cnn import fuse_conv_bn as mmcv_fuse
    model = Bottleneck(8)
    _, _, ours = fuse_and_compare(model, (X, ), traced=False)
    with torch.no_grad():
        reference = model(X)
        theirs = mmcv_fuse(model)(X)
    assert ours < 1e-5
    assert (theirs - reference).abs().max() > 1e-2


def test_d_shared_conv_gets_a_copy_per_place(traced):
    feats = [X, X[..., ::2, ::2], X[..., ::4, ::4]]
    head = SharedConvHead(8)
    fused, report, rel = fuse_and_compare(head, (feats, ), traced)
    assert rel < 1e-5
    identity_at(fused, [f'levels.{i}.1' for i in range(3)])
    convs = [fused.levels[i][0] for i in range(3)]
    assert len({id(c) for c in convs}) == 3  # each place has its own copy
    # One conv called from the same place before three different BNs stays.
    kept_at(fused, [f'loop_bns.{i}' for i in range(3)])
    assert torch.equal(fused.loop_conv.weight, head.loop_conv.weight)
    assert torch.equal(fused.loop_conv.bias, head.loop_conv.bias)
    assert not any(c is head.levels[0][0] for c in convs)


def test_d_shared_conv_module_per_level_convmodules(traced):
    """RetinaSepBNHead style: ConvModules per level share one conv."""

    class SepBNHead(nn.Module):

        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(
                ConvModule(8, 8, 3, padding=1, norm_cfg=dict(type='BN'))
                for _ in range(3))
            for level in range(1, 3):
                self.convs[level].conv = self.convs[0].conv

        def forward(self, feats):
            return [conv(f) for conv, f in zip(self.convs, feats)]

    feats = [X, X[..., ::2, ::2], X[..., ::4, ::4]]
    fused, _, rel = fuse_and_compare(SepBNHead(), (feats, ), traced)
    assert rel < 1e-5
    identity_at(fused, [f'convs.{i}.bn' for i in range(3)])


def test_d_mmcv_folds_every_bn_into_the_shared_conv():
    from mmcv.cnn import fuse_conv_bn as mmcv_fuse
    feats = [X, X[..., ::2, ::2], X[..., ::4, ::4]]
    head = SharedConvHead(8)
    fuse_and_compare(head, (feats, ), traced=False)
    with torch.no_grad():
        reference = head(feats)
        theirs = mmcv_fuse(head)(feats)
    assert max((a - b).abs().max() for a, b in zip(reference, theirs)) > 1e-2


def test_e_norm_over_concat_stays_unless_a_conv_follows(traced):
    fused, report, rel = fuse_and_compare(ConcatNorm(8, 16), (X, ), traced)
    assert rel < 1e-5
    kept_at(fused, ['bn'])
    model = nn.Sequential(ConcatNorm(8, 16), nn.Conv2d(16, 4, 1))
    fused, report, rel = fuse_and_compare(model, (X, ), traced)
    assert rel < 1e-5
    # The BN over the concat runs right before a 1x1 conv: exact there.
    if traced:
        identity_at(fused, ['0.bn'])


def test_e_mmcv_crashes_on_concat():
    from mmcv.cnn import fuse_conv_bn as mmcv_fuse
    model = ConcatNorm(8, 16).eval()
    with pytest.raises(RuntimeError):
        mmcv_fuse(model)(X)


def test_f_conv_output_used_twice_stays(traced):

    class Residual(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    fused, report, rel = fuse_and_compare(Residual(), (X, ), traced)
    assert rel < 1e-5
    kept_at(fused, ['bn'])


def test_f_conv_output_returned_as_well_stays():

    class AlsoReturned(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y), y

    fused, report, rel = fuse_and_compare(AlsoReturned(), (X, ), True)
    assert rel < 1e-5
    kept_at(fused, ['bn'])
    assert 'model output' in report.left[0].reason


def test_f_inplace_activation_between_stays():

    class InplaceAct(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)
            self.act = nn.ReLU(inplace=True)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.conv(x)
            self.act(y)  # modifies y in place: bn sees relu(conv(x))
            return self.bn(y)

    for traced in (False, True):
        fused, _, rel = fuse_and_compare(InplaceAct(), (X, ), traced)
        assert rel < 1e-5
        kept_at(fused, ['bn'])


def test_g_norm_over_sum_folds_into_each_conv(traced):
    fused, report, rel = fuse_and_compare(SumNorm(8), (X, ), traced)
    assert rel < 1e-5
    identity_at(fused, ['bn'])
    if report is not None:
        assert report.folded[0].kind == 'sum'
        assert [t.shift for t in report.folded[0].convs] == [True, False]


def test_g_sum_with_a_shared_input_conv_stays(traced):

    class SumReused(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv_a = nn.Conv2d(8, 8, 1)
            self.conv_b = nn.Conv2d(8, 8, 1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            a = self.conv_a(x)
            return self.bn(a + self.conv_b(x)) * a

    fused, _, rel = fuse_and_compare(SumReused(), (X, ), traced)
    assert rel < 1e-5
    kept_at(fused, ['bn'])


def test_demo_model_every_pattern(traced):
    model = build_demo_model()
    x = torch.randn(2, 3, 32, 32)
    fused, report, rel = fuse_and_compare(model, (x, ), traced)
    assert rel < 1e-5
    identity_at(fused, ['stem.1', 'block.bn1', 'block.bn2', 'sum_norm.bn',
                        'head.levels.0.1', 'pre_1x1.bn'])
    kept_at(fused, ['pre_3x3.bn', 'block.bn3', 'act_norm.bn',
                    'head.loop_bns.0'])
    if not traced:
        # DemoNet.forward iterates over a list: torch.fx cannot trace it, so
        # without an input fc -> fc_bn is not proven.
        kept_at(fused, ['fc_bn', 'concat.bn'])
        report = mmfuse.fuse_model(model, reparameterize=False)
        reasons = {s.name: s.reason for s in report.left}
        assert 'torch.fx cannot trace DemoNet' in reasons['fc_bn']
        assert 'torch.fx cannot trace SharedConvHead' in \
            reasons['head.loop_bns.0']
    else:
        identity_at(fused, ['fc_bn', 'concat.bn'])
    if report is not None:
        explained = {f.norm for f in report.folded} | \
            {s.name for s in report.left}
        assert len(explained) == report.num_norms == 16
        assert not report.undone
        if traced:
            assert report.max_rel_error < 1e-5


def test_a_conv_module_with_on_the_fly_conv_bn_fusion(traced):
    """mmcv's ConvModule can fuse conv and BN at run time (fast/efficient
    conv_bn_eval); after a fold that path must be switched off."""
    block = ConvModule(8, 8, 3, padding=1, norm_cfg=dict(type='BN'))
    for turn_on in ('turn_on_fast_conv_bn_eval',
                    'turn_on_efficient_conv_bn_eval'):
        if hasattr(block, turn_on):
            getattr(block, turn_on)()
    fused, _, rel = fuse_and_compare(block, (X, ), traced)
    assert rel < 1e-5
    if not traced:
        identity_at(fused, ['bn'])


def test_e_norm_over_concat_of_convs_folds_slices(traced):
    """CGNet's context guided block: bn(cat([conv_loc(x), conv_sur(x)]))."""

    class ContextGuided(nn.Module):

        def __init__(self):
            super().__init__()
            self.loc = nn.Conv2d(8, 4, 3, padding=1, groups=4)
            self.sur = nn.Conv2d(8, 6, 3, padding=2, dilation=2, bias=False)
            self.bn = nn.BatchNorm2d(10)

        def forward(self, x):
            return self.bn(torch.cat([self.loc(x), self.sur(x)], 1))

    fused, report, rel = fuse_and_compare(ContextGuided(), (X, ), traced)
    assert rel < 1e-5
    identity_at(fused, ['bn'])
    if report is not None:
        assert report.folded[0].kind == 'concat'
        assert [t.offset for t in report.folded[0].convs] == [0, 4]


def test_same_conv_output_twice_in_a_sum_or_concat_stays(traced):

    class Twice(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 4, 1)
            self.bn_sum = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(8, 4, 1)
            self.bn_cat = nn.BatchNorm2d(8)

        def forward(self, x):
            a = self.conv(x)
            b = self.conv2(x)
            return self.bn_sum(a + a), self.bn_cat(torch.cat([b, b], 1))

    fused, _, rel = fuse_and_compare(Twice(), (X, ), traced)
    assert rel < 1e-5
    kept_at(fused, ['bn_sum', 'bn_cat'])


@pytest.mark.parametrize('padding', [0, 1])
def test_a_conv_between_two_norms_absorbs_both_where_exact(padding, traced):
    """A norm after a conv and one right before it fold into the same conv
    (the one before only where the conv pads no zeros)."""
    model = nn.Sequential(nn.BatchNorm2d(8), nn.Conv2d(8, 6, 3,
                                                       padding=padding),
                          nn.BatchNorm2d(6), nn.ReLU())
    fused, report, rel = fuse_and_compare(model, (X, ), traced)
    assert rel < 1e-5
    identity_at(fused, ['2'])
    if padding:
        kept_at(fused, ['0'])
    else:
        identity_at(fused, ['0'])
    if report is not None:
        assert sorted(report.folded_names) == (['2'] if padding else
                                               ['0', '2'])


@pytest.mark.parametrize('in_place', [False, True])
def test_folds_into_one_conv_in_either_order(in_place):
    """Two folds into one conv, applied in either order, undoably or in
    place: the second reads what the first wrote."""
    from mmfuse.plan import FusionPlan
    from mmfuse.surgery import apply_plan
    model = randomize_norm_stats(
        nn.Sequential(nn.BatchNorm2d(8), nn.Conv2d(8, 6, 3),
                      nn.BatchNorm2d(6)).eval())
    with torch.no_grad():
        expected = model(X)
    plan = mmfuse.discover_folds(model)
    assert sorted(f.norm for f in plan.folds) == ['0', '2']
    for folds in (plan.folds, plan.folds[::-1]):
        fused = copy.deepcopy(model)
        apply_plan(fused, FusionPlan(list(folds)), undoable=not in_place)
        identity_at(fused, ['0', '2'])
        with torch.no_grad():
            assert output_error(expected, fused(X))[1] < 1e-5


class PoolNormThenConvModule(nn.Module):
    """BiSeNetV2's context block: a BN after a global pool runs right before
    a ConvModule 1x1 conv that has its own BN after it."""

    def __init__(self):
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(8))
        self.conv_gap = ConvModule(8, 8, 1, norm_cfg=dict(type='BN'))

    def forward(self, x):
        return x + self.conv_gap(self.gap(x))


def test_a_norm_before_a_conv_module_with_its_own_norm():
    fused, report, rel = fuse_and_compare(PoolNormThenConvModule(), (X, ),
                                          traced=True)
    assert rel < 1e-5
    identity_at(fused, ['gap.1', 'conv_gap.bn'])
    assert sorted(report.folded_names) == ['conv_gap.bn', 'gap.1']


def test_a_both_sides_of_a_copied_or_plain_conv_stay_one_fold():
    """A conv replaced by its fold (a plain conv for a weight-standardised
    one) takes no second norm: the second fold would not see the first."""
    from mmcv.cnn.bricks import ConvWS2d
    model = nn.Sequential(nn.BatchNorm2d(8), ConvWS2d(8, 6, 1),
                          nn.BatchNorm2d(6))
    fused, _, rel = fuse_and_compare(model, (X, ), traced=False)
    assert rel < 1e-5
    identity_at(fused, ['2'])
    kept_at(fused, ['0'])


class ReachesIntoChild(nn.Module):
    """Calls the conv of a Sequential(conv, bn) child directly too, and has
    a layer of its own: that second call must keep the unfolded conv."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1),
                                 nn.BatchNorm2d(8))
        self.head = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.head(self.seq(x)) + self.seq[0](x)


class AliasedConv(nn.Module):
    """One conv registered under two names (``convs.1`` and ``last``),
    called through one of them: a folded copy must not go to the other."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Conv2d(8, 8, 3, padding=1) for _ in range(2)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(8) for _ in range(2)])
        self.last = self.convs[-1]

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = torch.relu(bn(conv(x)))
        return x


@pytest.mark.parametrize('model', [ReachesIntoChild, AliasedConv])
def test_f_calls_a_trace_cannot_place_stay_exact(model, traced):
    fused, _, rel = fuse_and_compare(model(), (X, ), traced)
    assert rel < 1e-5
    if model is ReachesIntoChild:
        kept_at(fused, ['seq.1'])
    else:
        identity_at(fused, ['bns.0'])  # the conv with one name folds
        kept_at(fused, ['bns.1'])


class ReadsConvWeight(nn.Module):
    """Uses the conv's weight outside a call of it as well."""

    def __init__(self, direct: bool):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.direct = direct

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.direct:
            return y + torch.nn.functional.conv2d(x, self.conv.weight,
                                                  padding=1)
        return y + self.conv.forward(x)


@pytest.mark.parametrize('direct', [True, False])
def test_f_conv_weight_used_outside_a_call_stays(direct, traced):
    fused, report, rel = fuse_and_compare(ReadsConvWeight(direct), (X, ),
                                          traced)
    assert rel < 1e-5
    if not traced:
        kept_at(fused, ['bn'])


def _site_by_name_search(caller, module):
    """The site as ``resolve_site`` defines it: the one name ``module``
    has below ``caller``, or ``None``."""
    if caller is None:
        return None
    found = [
        name for name, sub in caller.named_modules(remove_duplicate=False)
        if sub is module and name
    ]
    if len(found) != 1:
        return None
    parent, _, attr = found[0].rpartition('.')
    return caller.get_submodule(parent) if parent else caller, attr


def test_call_sites_match_a_search_of_the_callers_names():
    """The quick way to a call's site (one path in the whole model) gives
    what searching the caller's names gives, for every caller and module
    of models with module lists, shared heads and a module registered
    twice."""
    from mmfuse.demo import build_demo_model
    from mmfuse.discovery.traced import TracedForward
    models = [build_demo_model(), SharedConvHead(4), AliasedConv()]
    twice = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ModuleList([nn.ReLU()]))
    twice.add_module('again', twice[1])
    models.append(twice)
    checked = 0
    for model in models:
        traced = TracedForward(model, ())
        modules = list(model.modules())
        for caller in modules + [None]:
            for module in modules:
                site = traced.resolve_site(caller, module)
                expected = _site_by_name_search(caller, module)
                assert (site is None) == (expected is None)
                if site is not None:
                    assert site[0] is expected[0] and site[1] == expected[1]
                checked += 1
    assert checked > 100


class KeywordUse(nn.Module):
    """A conv output that a leaf also gets as a keyword argument (which
    a global forward pre-hook does not see)."""

    def __init__(self, inplace_act: bool):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.inplace_act = inplace_act
        self.act = nn.ReLU(inplace=True)
        self.side = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.inplace_act:
            z = self.bn(y)
            # Changes y in place: the value bn read is the one before.
            self.act(input=y)
            return z + y
        return self.bn(y) + self.side(input=y)


@pytest.mark.parametrize('inplace_act', [False, True])
def test_f_conv_output_given_to_a_leaf_by_keyword_stays(inplace_act):
    model = randomize_norm_stats(KeywordUse(inplace_act).eval())
    plan = mmfuse.discover_folds(model, (X, ))
    assert [f.norm for f in plan.folds] == []
    fused, report, rel = fuse_and_compare(model, (X, ), True)
    assert rel < 1e-5
    kept_at(fused, ['bn'])
    assert report.undone == []


def test_a_conv_called_with_its_input_by_keyword_folds():

    class KeywordInput(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn(input=self.conv(input=x))

    fused, report, rel = fuse_and_compare(KeywordInput(), (X, ), True)
    assert rel < 1e-5
    identity_at(fused, ['bn'])
    assert [f.norm for f in report.folded] == ['bn']


def test_f_conv_output_used_by_a_module_outside_the_model_stays():

    class Unregistered(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)
            self.bn = nn.BatchNorm2d(8)
            self.hidden = [nn.Conv2d(8, 8, 1).eval()]  # not a submodule

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + self.hidden[0](y)

    model = randomize_norm_stats(Unregistered().eval())
    assert mmfuse.discover_folds(model, (X, )).folds == []
    fused, report, rel = fuse_and_compare(model, (X, ), True)
    assert rel < 1e-5
    kept_at(fused, ['bn'])


def test_f_a_use_after_a_caught_error_in_a_leaf_is_seen():
    """A leaf that raises, caught by the model, which goes on: what runs
    after is recorded (the conv output used again keeps its norm)."""
    model = randomize_norm_stats(RaisesAfterNorm(catch=True).eval())
    plan = mmfuse.discover_folds(model, (X, ))
    assert plan.folds == []
    assert 'also used by operation' in plan.skipped[0].reason
    fused, report, rel = fuse_and_compare(model, (X, ), True)
    assert rel < 1e-5 and report.undone == []
    kept_at(fused, ['bn'])
