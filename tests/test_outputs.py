"""Outputs held in dataclasses, dict subclasses, MMEngine data elements and
plain objects: their tensors count as used by the output (traced
discovery) and are compared (verification)."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
from mmengine.structures import BaseDataElement
from torch import nn

import mmfuse
from fusion_checks import changed_where_marked, kept_at
from mmfuse.guards import FusionError
from mmfuse.output_tree import UncomparableOutput, flatten_output
from mmfuse.testing import randomize_norm_stats
from mmfuse.verify import output_error

X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


@dataclasses.dataclass
class Out:
    feat: torch.Tensor
    logits: torch.Tensor


class Tagged(dict):
    """A dict subclass, as some heads return."""


def _as_dataclass(feat, logits):
    return Out(feat, logits)


def _as_data_element(feat, logits):
    return [BaseDataElement(feat=feat, logits=logits, metainfo=dict(k=1))]


def _as_dict_subclass(feat, logits):
    return Tagged(feat=feat, logits=logits)


def _as_object(feat, logits):
    holder = type('Holder', (), {})()
    holder.feat, holder.logits = feat, logits
    return holder


WRAPPERS = [_as_dataclass, _as_data_element, _as_dict_subclass, _as_object]


class ConvBNWrapped(nn.Module):
    """Returns the conv output and the norm of it, wrapped."""

    def __init__(self, wrap):
        super().__init__()
        self.wrap = wrap
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        # Zero padding: the norm before it stays there too.
        self.head = nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        feat = self.conv(x)
        return self.wrap(feat, self.head(self.bn(feat)))


def _leaves(output):
    return flatten_output(output).leaves


@pytest.mark.parametrize('wrap', WRAPPERS, ids=lambda w: w.__name__)
def test_a_conv_output_in_a_wrapped_output_is_used(wrap):
    """The conv's output is also returned (inside the wrapper): its norm
    stays; the head's folds."""
    torch.manual_seed(0)
    model = randomize_norm_stats(ConvBNWrapped(wrap).eval(), seed=0)
    with torch.no_grad():
        reference = _leaves(model(X))
    for verify in (True, False):
        fused = copy.deepcopy(model)
        report = mmfuse.fuse_model(fused, (X, ), verify=verify)
        assert report.folded_names == ['head.1']
        kept_at(fused, ['bn'])
        with torch.no_grad():
            assert output_error(reference, _leaves(fused(X)))[1] < 1e-5
    assert len(reference) == 2


@pytest.mark.parametrize('wrap', WRAPPERS, ids=lambda w: w.__name__)
def test_verification_compares_wrapped_outputs(wrap):
    """A fold made wrong by a change discovery cannot see is caught in a
    wrapped output too (before, nothing inside was compared: reported
    0, off by 2 to 5)."""
    torch.manual_seed(0)
    model = randomize_norm_stats(ConvBNWrapped(wrap).eval(), seed=0)
    model.head[0].doubled = True
    with changed_where_marked('doubled', lambda output: output * 2):
        with torch.no_grad():
            reference = _leaves(model(X))
        report = mmfuse.fuse_model(model, (X, ))
        with torch.no_grad():
            assert output_error(reference, _leaves(model(X)))[1] < 1e-5
    assert [s.name for s in report.undone] == ['head.1']


class WritesIntoReturnedBuffer(nn.Module):
    """Returns a buffer it overwrites on every call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer('out', torch.zeros(2, 4, 8, 8))

    def forward(self, x):
        self.out.copy_(self.bn(self.conv(x)))
        return self.out


def test_reference_is_kept_apart_from_a_returned_buffer():
    """The reference is a copy: the fused model's pass cannot overwrite
    it, so the wrong fold is caught (before, the check compared the
    output with itself)."""
    model = randomize_norm_stats(WritesIntoReturnedBuffer().eval(), seed=0)
    model.conv.doubled = True
    with changed_where_marked('doubled', lambda output: output * 2):
        with torch.no_grad():
            reference = model(X).clone()
        report = mmfuse.fuse_model(model, (X, ))
        with torch.no_grad():
            assert output_error(reference, model(X))[1] < 1e-5
    assert [s.name for s in report.undone] == ['bn']


class Slotted:
    __slots__ = ('value', )

    def __init__(self, value):
        self.value = value


class ReturnsSlots(nn.Module):

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        return Slotted(self.body(x))


def test_an_output_that_cannot_be_read_is_refused_before_any_change():
    model = randomize_norm_stats(ReturnsSlots().eval(), seed=0)
    with pytest.raises(FusionError, match='holds a Slotted'):
        mmfuse.fuse_model(model, (X, ))
    kept_at(model, ['body.1'])
    report = mmfuse.fuse_model(model, (X, ), verify=False)
    assert report.folded_names == ['body.1']


def test_flattened_outputs_compare_constants_floats_and_arrays():
    first = flatten_output({'n': 3, 'score': 0.5, 'a': np.ones(2)})
    assert len(first.leaves) == 2
    assert output_error(first, {'n': 3, 'score': 0.5, 'a': np.ones(2)}) \
        == (0.0, 0.0)
    with pytest.raises(UncomparableOutput):
        flatten_output([Slotted(1)])


def test_value_objects_and_string_arrays_are_compared_by_equality():
    """A path, a date, an array of strings: compared as values (before,
    a string array raised and a path made verification impossible)."""
    import datetime
    import pathlib
    output = {'path': pathlib.Path('/x'), 'day': datetime.date(2020, 1, 1),
              'names': np.array(['a', 'b']), 't': torch.ones(2)}
    same = {'path': pathlib.Path('/x'), 'day': datetime.date(2020, 1, 1),
            'names': np.array(['a', 'b']), 't': torch.ones(2)}
    assert output_error(output, same) == (0.0, 0.0)
    other = dict(same, names=np.array(['a', 'c']))
    assert output_error(output, other)[1] == float('inf')


class _MergeableSlotted(nn.Module):

    def __init__(self):
        super().__init__()
        from mmpretrain.models.backbones.repvgg import RepVGGBlock
        self.block = RepVGGBlock(4, 4)

    def forward(self, x):
        return Slotted(self.block(x))


def test_merges_whose_output_cannot_be_read_are_undone_before_the_error():
    model = randomize_norm_stats(_MergeableSlotted().eval(), seed=0)
    with pytest.raises(FusionError, match='cannot verify the merges'):
        mmfuse.reparameterize(model, (X, ))
    assert type(model.block).__name__ == 'RepVGGBlock'


class _ScalesAnOverflowDown(nn.Module):
    """A conv whose output overflows, then a norm that scales it down."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize('dtype, weight, scale', [
    (torch.float32, 3e38, 1e-30), (torch.float16, 35000.0, 1e-2)])
def test_an_output_that_is_not_finite_must_stay_so(dtype, weight, scale):
    """The unfused output is inf where the conv overflows; folded, the norm
    scales the weight down first and the output is finite there.  The
    check compared only where the reference is finite: verified, 'rel
    error 1e-7', with 6e8 where inf was."""
    model = _ScalesAnOverflowDown().eval()
    with torch.no_grad():
        model.conv.weight.fill_(weight)
        model.conv.bias.zero_()
        model.bn.weight.copy_(torch.tensor([scale, -scale]))
        model.bn.bias.zero_()
    model = model.to(dtype)
    x = torch.full((1, 1, 2, 2), 2.0, dtype=dtype)
    x[0, 0, 1, 1] = 1e-3
    reference = copy.deepcopy(model)
    report = mmfuse.fuse_model(model, (x, ))
    assert not report.folded and [s.name for s in report.undone] == ['bn']
    with torch.no_grad():
        assert torch.equal(reference(x), model(x))


class _Returns(nn.Module):
    """Returns ``bn(conv(x))`` through ``wrap``."""

    def __init__(self, wrap):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.wrap = wrap

    def forward(self, x):
        return self.wrap(self.bn(self.conv(x)))


def test_a_sparse_output_is_compared_dense():
    """Its check raised (no isnan for sparse tensors) after the folds,
    which stayed in the model."""
    model = randomize_norm_stats(_Returns(lambda y: y.to_sparse()).eval())
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    report = mmfuse.fuse_model(model, (x, ))
    assert [f.norm for f in report.folded] == ['bn']
    with torch.no_grad():
        assert output_error(reference(x).to_dense(),
                            model(x).to_dense())[1] < 1e-5


@pytest.mark.parametrize('wrap', [
    lambda y: {y.sum(): y},
    lambda y: np.array([y, None], dtype=object),
], ids=['tensor key', 'object array'])
def test_tensors_in_keys_or_object_arrays_are_refused_before_any_change(
        wrap):
    """Comparing the specs raised ('Boolean value of Tensor ... is
    ambiguous') after the folds, which stayed in the model."""
    model = randomize_norm_stats(_Returns(wrap).eval())
    with pytest.raises(FusionError, match='cannot verify'):
        mmfuse.fuse_model(model, (torch.randn(2, 3, 6, 6), ))
    kept_at(model, ['bn'])


# ------------------------------------- tensors held past fields and items


@dataclasses.dataclass
class _Step:
    step: int = 0


class _Base:
    pass


class _SlottedChild(_Base):
    __slots__ = ('feat', )


def _in_extra_dataclass_attribute(y):
    holder = _Step()
    holder.feat = y
    return holder


def _in_dict_subclass_attribute(y):
    holder = Tagged()
    holder.feat = y
    return holder


def _in_slot_beside_a_dict(y):
    holder = _SlottedChild()
    holder.feat = y
    return holder


def _in_list_subclass_attribute(y):
    holder = type('Items', (list, ), {})([1])
    holder.feat = y
    return holder


class _SkipsReluWithoutNorm(nn.Module):
    """An optional-norm block (``if not isinstance(self.norm,
    nn.Identity)``): a fold changes its output, which no trace shows and
    verification must."""

    def __init__(self, wrap):
        super().__init__()
        self.wrap = wrap
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.norm(self.conv(x))
        if not isinstance(self.norm, nn.Identity):
            y = torch.relu(y)
        return self.wrap(y)


@pytest.mark.parametrize('wrap', [
    _in_extra_dataclass_attribute, _in_dict_subclass_attribute,
    _in_slot_beside_a_dict, _in_list_subclass_attribute
], ids=lambda w: w.__name__)
def test_tensors_past_fields_and_items_are_compared(wrap):
    """A tensor in an attribute of a dataclass that is not a field, of a
    dict or list subclass, or in a slot of an object with a ``__dict__``
    was not compared: the wrong fold was kept (off by 0.45 to 4.9)."""
    model = randomize_norm_stats(_SkipsReluWithoutNorm(wrap).eval(), seed=0)
    with torch.no_grad():
        reference = model(X).feat.clone()
    report = mmfuse.fuse_model(model, (X, ))
    assert [s.name for s in report.undone] == ['norm']
    with torch.no_grad():
        assert torch.equal(model(X).feat, reference)


class _ReturnsABufferOfAnotherModule(_SkipsReluWithoutNorm):
    """Writes its output into a buffer of a module it never calls, and
    returns it: the float64 pass of a failed check wrote the unfused
    output there, and the failed output, judged again, passed."""

    def __init__(self):
        super().__init__(lambda y: y)
        self.store = nn.Module()
        self.store.register_buffer('out', torch.zeros(2, 4, 8, 8))

    def forward(self, x):
        self.store.out.copy_(super().forward(x))
        return self.store.out


def test_an_output_judged_again_is_the_one_checked():
    model = randomize_norm_stats(_ReturnsABufferOfAnotherModule().eval(),
                                 seed=0)
    with torch.no_grad():
        reference = model(X).clone()
    report = mmfuse.fuse_model(model, (X, ))
    assert [s.name for s in report.undone] == ['norm']
    with torch.no_grad():
        assert torch.equal(model(X), reference)


class _ZeroesAViewOfItsInput(nn.Module):
    """A norm before a conv that pads without zeros, and an in-place
    change of the norm's input through another argument, a view of it."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode='replicate')

    def forward(self, x, tail):
        y = self.norm(x)
        tail.zero_()
        return self.conv(y)


def test_example_inputs_that_share_memory_share_it_in_each_pass():
    """Each pass cloned the arguments one by one: the change through
    ``tail`` did not reach ``x``, and the fold (off by 1.3 on the
    arguments as given) was verified."""
    model = randomize_norm_stats(_ZeroesAViewOfItsInput().eval(), seed=0)
    base = X.clone()
    with torch.no_grad():
        reference = model(base, base[1:])
    given = X.clone()
    report = mmfuse.fuse_model(model, (given, given[1:]))
    assert torch.equal(given, X)  # the caller's inputs are not changed
    assert not report.folded
    base = X.clone()
    with torch.no_grad():
        assert torch.equal(model(base, base[1:]), reference)


def test_inputs_over_one_array_that_are_no_views_are_copied_apart():
    """Two tensors made over one numpy array (``from_numpy`` of a slice
    and of the whole) lie at one address in two storages: they were
    taken for views of one, and the larger got the smaller's copy,
    grown with garbage (up to 4.6e37; the fold was then undone)."""
    from mmfuse.guards import fresh_inputs
    array = np.random.default_rng(0).standard_normal(
        (2, 4, 8, 8)).astype(np.float32)
    first, whole = torch.from_numpy(array[:1]), torch.from_numpy(array)
    copies = fresh_inputs((first, whole))
    assert torch.equal(copies[0], first) and torch.equal(copies[1], whole)
    assert copies[1].data_ptr() != whole.data_ptr()


class _Serial(dict):
    """Outputs with a serial number that changes on every call."""


class _ReturnsASerial(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = _Serial(feat=self.bn(self.conv(x)))
        out.serial = self.calls
        return out


def test_an_output_unlike_the_reference_in_a_constant_says_so():
    """Constants are compared exactly, so a changing serial undoes the
    fold; the reason said 'off by more than rtol' before."""
    model = randomize_norm_stats(_ReturnsASerial().eval(), seed=0)
    report = mmfuse.fuse_model(model, (X, ))
    assert [s.name for s in report.undone] == ['bn']
    assert 'a constant' in report.undone[0].reason


def _plain_error(reference, output):
    """``(abs, rel)`` error as the float64 formula states it, over the
    places where ``reference`` is finite."""
    ref, out = reference.double(), output.double()
    finite = torch.isfinite(ref)
    diff = (ref - out).abs()[finite]
    if not diff.numel():
        return 0.0, 0.0
    scale = float(ref[finite].abs().max())
    return float(diff.max()), float(diff.max()) / scale


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16,
                                   torch.bfloat16, torch.float64])
@pytest.mark.parametrize('odd', [None, 'inf', 'nan', 'both', 'ref_only'])
def test_output_error_is_the_float64_formula(dtype, odd):
    """The error of a tensor, also where one holds infs or NaNs, is the
    float64 formula's (the finite case takes a shorter way)."""
    gen = torch.Generator().manual_seed(3)
    reference = (torch.randn(64, generator=gen) * 50).to(dtype)
    output = (reference.double() +
              torch.randn(64, generator=gen, dtype=torch.float64) *
              1e-2).to(dtype)
    if odd in ('inf', 'both'):
        reference[3] = output[3] = float('-inf')
    if odd in ('nan', 'both'):
        reference[5] = output[5] = float('nan')
    if odd == 'ref_only':
        reference[7] = float('inf')
        assert output_error(reference, output) == (float('inf'),
                                                   float('inf'))
        return
    expected = _plain_error(reference, output)
    assert output_error(reference, output) == expected
    assert expected[0] > 0
    if odd is None:
        output[9] = float('nan')
        assert output_error(reference, output)[1] == float('inf')


class _TurnsBool(nn.Module):
    """Float output on the traced pass, a bool one after."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        y = self.bn(self.conv(x))
        return y if self.calls == 1 else y > 0


def test_an_output_of_another_dtype_fails_the_check_without_error():
    """A bool output against a float reference is measured as numbers
    (the finite fast path took only floating point outputs)."""
    model = randomize_norm_stats(_TurnsBool().eval(), seed=0)
    report = mmfuse.fuse_model(model, (torch.randn(1, 3, 8, 8), ))
    assert not report.folded
    assert [s.name for s in report.undone] == ['bn']
    assert isinstance(model.bn, nn.BatchNorm2d)
