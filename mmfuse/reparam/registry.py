"""``REPARAMETERIZERS``: rules for blocks that need their own.

An entry is a class derived from :class:`Reparameterizer`, registered with
``@REPARAMETERIZERS.register_module()``.  It names the block classes it
handles in ``targets`` (classes, or ``'module.QualName'`` strings so that
the block's package need not be imported) and describes a block as a
:class:`BranchSum`: the branches summed and the children applied to the
sum, in order.  mmfuse merges the branches into one ``nn.Conv2d`` and
replaces the block with ``nn.Sequential(conv, *after)``.

Lookup is by the block's exact class: a subclass may compute something
else, so it needs its own entry (or the generic merge).

Example::

    @REPARAMETERIZERS.register_module()
    class MyBlockRule(Reparameterizer):
        targets = (MyBlock, )

        def branches(self, block):
            return BranchSum(
                terms=[Term([conv_op(block.conv3), norm_op(block.bn3)]),
                       Term([conv_op(block.conv1), norm_op(block.bn1)])],
                after=['act'])
"""
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Type, Union

from mmengine.registry import Registry
from torch import nn

from .branches import Term

__all__ = ['REPARAMETERIZERS', 'Reparameterizer', 'BranchSum',
           'ReparamRefused', 'find_reparameterizer', 'class_path']

#: Rules that turn a block into its deploy form, looked up by block class.
REPARAMETERIZERS = Registry('reparameterizer')


class ReparamRefused(ValueError):
    """Raised by an entry for a block it cannot convert; the message says
    why and ends up in the records."""


@dataclass
class BranchSum:
    """A block as ``after[-1](...after[0](sum(terms)))``.

    Attributes:
        terms: The branches, each read from the block's input.
        after: Paths (relative to the block) of the children applied to
            the sum, in order; kept in the deploy form.
    """
    terms: List[Term]
    after: List[str] = field(default_factory=list)


class Reparameterizer:
    """Base class of ``REPARAMETERIZERS`` entries.

    Attributes:
        targets: The block classes handled: classes, or their
            ``'module.QualName'``.
    """
    targets: Tuple[Union[Type[nn.Module], str], ...] = ()

    def branches(self, block: nn.Module) -> BranchSum:
        """Describe ``block`` (in eval mode) as a sum of branches.

        Raises:
            ReparamRefused: When this block cannot be converted.
        """
        raise NotImplementedError


def class_path(cls: type) -> str:
    """``'module.QualName'`` of a class."""
    return f'{cls.__module__}.{cls.__qualname__}'


def find_reparameterizer(
        module: nn.Module) -> Optional[Tuple[str, Reparameterizer]]:
    """``(entry name, entry)`` for ``module``'s exact class, if any."""
    cls = type(module)
    path = class_path(cls)
    for name, entry in REPARAMETERIZERS.module_dict.items():
        for target in getattr(entry, 'targets', ()):
            if target is cls or target == path:
                return name, entry()
    return None
