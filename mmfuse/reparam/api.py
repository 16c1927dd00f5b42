"""Re-parameterize a model: merge multi-branch blocks into single convs.

:func:`reparameterize` walks the model once.  A block whose exact class has
a ``REPARAMETERIZERS`` entry is converted by it; any other module is
analysed by the generic merge after its children, so the smallest module
holding a branch sum is the one rewritten.  Only with
``call_deploy_methods=True`` does a block's own ``switch_to_deploy``,
``reparameterize`` or ``fuse`` run, on a copy that replaces the block only
if the method changed something.

Every change is recorded as a JSON-serialisable dict so that
:func:`apply_reparam_structure` can give a freshly built model the same
structure, after which a state dict saved from the re-parameterized model
loads with no missing or unexpected keys.
"""
import copy
import inspect
import re
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import fx, nn

from ..discovery.fx_tracer import class_namespaces, is_plain
from ..discovery.structural import names_read_above, reached_inside
from ..folding import norm_affines
from ..guards import (FusionError, as_input_tuple, check_eval,
                      fresh_inputs, unwrap_model)
from ..layers import (global_hook_problem, is_conv_layer,
                      norm_affine_params, norm_fold_problem,
                      runs_class_forward)
from ..module_walk import class_memo, classes_unchanged, walk_modules
from ..verify import (OutputCheck, default_rtol, isolate_failures,
                      output_check, search_checks)
from .branches import build_conv, describe_term, merge_terms, norm_ops
from .generic import BlockRewrite, GenericMerger
from .merge import ConvGeometry, MergeError
from .registry import ReparamRefused, class_path, find_reparameterizer

__all__ = [
    'reparameterize', 'merge_blocks', 'Merges', 'apply_reparam_structure',
    'DEPLOY_METHODS'
]

#: Methods called, in this order of preference, with
#: ``call_deploy_methods=True``.
DEPLOY_METHODS = ('switch_to_deploy', 'reparameterize', 'fuse')


class _Group:
    """Replacements that stand or fall together (nested ones)."""

    def __init__(self):
        self.steps: List[Tuple[nn.Module, str, nn.Module, nn.Module]] = []
        self.paths: List[str] = []
        self.records: List[Dict] = []

    def undo(self) -> None:
        for parent, attr, old, _ in reversed(self.steps):
            parent._modules[attr] = old

    def redo(self) -> None:
        for parent, attr, _, new in self.steps:
            parent._modules[attr] = new


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + '.') or b.startswith(a + '.')


def _join(path: str, name: str) -> str:
    return f'{path}.{name}' if path else name


def _first_tensor(module: nn.Module) -> Optional[torch.Tensor]:
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor
    return None


def _carry_attributes(old: nn.Module, new: nn.Module) -> None:
    """Give ``new``, which replaces the merged block ``old``, the public
    plain attributes (numbers, strings, ``None``, tuples of them) of
    ``old`` that it lacks, its instance's and its class's (torch's
    classes aside): code outside the block may read them
    (``self.block(x) * self.block.out_channels`` raised once the block was
    a Sequential).  A ``GraphModule`` keeps them through ``deepcopy`` too
    (torch.fx's user-preserved attributes)."""
    found = dict(_class_attributes(type(old))[0])
    found.update(old.__dict__)
    carried = {
        name: value
        for name, value in found.items()
        if not name.startswith('_') and is_plain(value)
        and not hasattr(new, name)
    }
    new.__dict__.update(carried)
    preserved = getattr(fx.graph_module, '_USER_PRESERVED_ATTRIBUTES_KEY',
                        None)
    if carried and isinstance(new, fx.GraphModule) and preserved:
        new.meta.setdefault(preserved, {}).update(carried)


def _attributes_changed(old: nn.Module, new: nn.Module) -> Set[str]:
    """The public attributes of ``old`` (its own, its parameters, buffers
    and children, its class's plain values and properties; torch's
    classes aside) that ``new``, which replaces it, would not give as it
    does (``self.block.rbr_1x1.conv.weight`` read from above):
    it lacks them, or has them otherwise (a merged conv's ``groups`` for
    a block's channel-shuffle ``groups``).  Properties are not run."""
    _, plain, properties = _class_attributes(type(old))
    mine = dict(plain)
    mine.update((name, value) for name, value in old.__dict__.items()
                if not name.startswith('_'))
    for table in (old._parameters, old._buffers, old._modules):
        mine.update(table)
    changed = set(properties)
    for name, value in mine.items():
        theirs = getattr(new, name, _NO_ATTRIBUTE)
        if theirs is value:
            continue
        if not (is_plain(value) and type(theirs) is type(value)
                and theirs == value):
            changed.add(name)
    return changed


_NO_ATTRIBUTE = object()


def _class_attributes(
        cls: type) -> Tuple[Dict[str, Any], Dict[str, Any], Set[str]]:
    """The public attributes of ``cls`` and its bases but torch's, as an
    instance finds them; the plain values among those of each class (a
    base's where a subclass's is not plain too); the names of their
    properties.  Kept while no class changes (during a merge walk)."""
    memo = class_memo('public class attributes')
    known = None if memo is None else memo.get(cls)
    if known is not None:
        return known
    found: Dict[str, Any] = {}
    plain: Dict[str, Any] = {}
    properties: Set[str] = set()
    for namespace in reversed(class_namespaces(cls)):
        for name, value in namespace.items():
            if name.startswith('_'):
                continue
            found[name] = value
            if isinstance(value, property):
                properties.add(name)
            elif is_plain(value):
                plain[name] = value
    known = found, plain, frozenset(properties)
    if memo is not None:
        memo[cls] = known
    return known


def _deploy_sequential(block: nn.Module, convs: Dict[str, nn.Conv2d],
                       layers: Sequence[Tuple[str, Optional[str]]]
                       ) -> nn.Module:
    """``nn.Sequential`` of ``layers`` (or the conv alone)."""
    if len(layers) == 1 and layers[0][1] is None:
        return convs[layers[0][0]]
    children = OrderedDict()
    for name, origin in layers:
        children[name] = convs[name] if origin is None else \
            block.get_submodule(origin)
    new = nn.Sequential(children)
    new.train(block.training)
    return new


#: Why a block reached into from outside is not merged.
_REACHED = ('a module outside it calls a layer inside it, which the merge '
            'would remove')


class _Walker:

    def __init__(self,
                 model: nn.Module,
                 call_deploy_methods: bool,
                 use_registry: bool,
                 generic_blocks: Optional[Set[int]] = None,
                 reached: Optional[Dict[int, Set[int]]] = None):
        self.model = model
        self.generic_blocks = generic_blocks
        self.reached = reached or {}
        self.call_deploy_methods = call_deploy_methods
        self.use_registry = use_registry
        # Registry entries by block class, looked up once per walk.
        self.entries: Dict[type, Any] = {}
        # Made when a generic merge is first tried (its trace cache reads
        # the whole model): most walks of an observed model try none.
        self._merger: Optional[GenericMerger] = None
        self.groups: List[_Group] = []
        self.records: List[Dict] = []
        # What the registry entry of each block gave (its branches, or why
        # it refused), and the norms' affine maps by id, made before the
        # walk; the norms are held so that no id is reused meanwhile.
        self.branches: Dict[int, Any] = {}
        self.affines: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.affine_norms: List[nn.Module] = []

    # -- bookkeeping -------------------------------------------------------
    def attributes_read(self, path: str, old: nn.Module,
                        new: nn.Module) -> Optional[str]:
        """Why ``new`` may not replace ``old``: code above it may read an
        attribute of ``old`` that ``new`` would give otherwise (read
        from that code, with an example input too: a forward pass shows
        calls, not attribute reads); ``None`` if none.  ``new`` is given
        the attributes of ``old`` it carries first
        (:func:`_carry_attributes`)."""
        _carry_attributes(old, new)
        changed = _attributes_changed(old, new)
        if not changed:
            return None
        read = names_read_above(self.model, path)
        names = sorted(changed if read is None else changed & read)
        if not names:
            return None
        return (f'code above the block may read its attribute '
                f'{", ".join(names[:3])}, which the merged '
                f'{type(new).__name__} would not give as the block does')

    def replace(self, parent: nn.Module, attr: str, path: str,
                old: nn.Module, new: nn.Module, record: Dict) -> None:
        """Put ``new`` in place of ``old``, which it replaces as a child
        of ``parent``; it has the attributes of ``old`` it carries
        (:func:`_carry_attributes`) already."""
        parent._modules[attr] = new
        group = _Group()
        for other in list(self.groups):
            if any(_related(path, p) for p in other.paths):
                self.groups.remove(other)
                group.steps += other.steps
                group.paths += other.paths
                group.records += other.records
        group.steps.append((parent, attr, old, new))
        group.paths.append(path)
        group.records.append(record)
        self.groups.append(group)
        self.records.append(record)

    def left(self, path: str, module: nn.Module, rule: str,
             reason: str) -> None:
        self.records.append({
            'module': path,
            'type': class_path(type(module)),
            'rule': rule,
            'merged': False,
            'reason': reason
        })

    # -- the walk ----------------------------------------------------------
    def run(self) -> List[Dict]:
        if self.use_registry:
            self.read_registry_blocks()
        # The walk replaces modules, no class: what the code of each class
        # above a block reads is checked against the class once.
        with classes_unchanged():
            self.visit_children(self.model, '')
        if self.call_deploy_methods:
            self.deploy_methods(self.model, '')
        return self.records

    def read_registry_blocks(self) -> None:
        """Read the branches of every block a registry entry converts, and
        compute the affine maps of all their foldable norms together: a
        few tensor operations for the model rather than a few for each
        block.  The walk then merges each block from what was read here:
        a block is visited before anything below it changes, and merging
        changes no norm."""
        norms: Dict[int, nn.Module] = {}
        for _, module in walk_modules(self.model):
            found = _registry_entry(module, self.entries)
            if found is None:
                continue
            try:
                terms = found[1].branches(module)
            except (ReparamRefused, MergeError) as refusal:
                self.branches[id(module)] = refusal
                continue
            self.branches[id(module)] = terms
            for op in norm_ops(terms.terms):
                if norm_fold_problem(op.module) is None:
                    norms.setdefault(id(op.module), op.module)
        self.affine_norms = list(norms.values())
        self.affines = dict(
            zip(norms,
                norm_affines([norm_affine_params(m)
                              for m in self.affine_norms])))

    def visit_children(self, module: nn.Module, path: str) -> bool:
        has_conv = False
        for name, child in list(module._modules.items()):
            if child is not None:
                has_conv |= self.visit(module, name, _join(path, name), child)
        return has_conv

    def visit(self, parent: nn.Module, attr: str, path: str,
              module: nn.Module) -> bool:
        """Convert ``module`` and what is under it; returns whether a conv
        remains under it."""
        if isinstance(module, nn.Conv2d):
            return True
        if not module._modules and (not self.use_registry or _registry_entry(
                module, self.entries) is None):
            return False  # a layer without children nor a registry entry
        if not runs_class_forward(module):
            return self.visit_children(module, path)
        found = _registry_entry(module, self.entries) \
            if self.use_registry else None
        if found is not None and (module._forward_hooks
                                  or module._forward_pre_hooks):
            # The hooks would be lost with the block (as for generic
            # merges, whose blocks with hooks are not tried).
            self.left(path, module, found[0], 'the block has forward hooks, '
                      'which a merged conv would not run')
            return self.visit_children(module, path)
        if found is not None:
            name, entry = found
            try:
                terms = self.branches.pop(id(module), None)
                if terms is None:
                    terms = entry.branches(module)
                elif isinstance(terms, Exception):
                    raise terms  # the entry's refusal, read before
                geometry, weight, bias = merge_terms(
                    terms.terms, self.affines)
            except (ReparamRefused, MergeError) as error:
                self.left(path, module, name, str(error))
                return self.visit_children(module, path)
            conv = build_conv(geometry, weight, bias)
            after = [
                origin for origin in terms.after
                if not _plain_identity(module.get_submodule(origin))
            ]
            if self.removes_reached(module, after):
                self.left(path, module, name, _REACHED)
                return self.visit_children(module, path)
            conv_name = 'conv' if 'conv' not in after else 'reparam_conv'
            layers = [(conv_name, None)] + [
                (origin.replace('.', '_'), origin) for origin in after
            ]
            new = _deploy_sequential(module, {conv_name: conv}, layers)
            read = self.attributes_read(path, module, new)
            if read:
                self.left(path, module, name, read)
                return self.visit_children(module, path)
            names = {id(m): n for n, m in walk_modules(module) if n}
            record = self.merged_record(path, module, name, layers, [{
                'name': conv_name,
                'geometry': geometry.to_dict(),
                'branches': [describe_term(t, names) for t in terms.terms]
            }])
            self.replace(parent, attr, path, module, new, record)
            for key, origin in layers:
                if origin is not None:
                    self.visit(new, key, _join(path, key), new._modules[key])
            return True
        has_conv = self.visit_children(module, path)
        if not has_conv or module._forward_hooks or \
                module._forward_pre_hooks:
            return has_conv
        if self.generic_blocks is not None and \
                id(module) not in self.generic_blocks:
            return True
        if self._merger is None:
            self._merger = GenericMerger(self.model)
        rewrite, reasons = self._merger.rewrite(module, path)
        for reason in reasons:
            self.left(path, module, 'generic', reason)
        graph = rewrite is not None and rewrite.structure == 'graph'
        if rewrite is not None and self.removes_reached(
                module, rewrite.kept if graph else [
                    origin for _, origin in rewrite.layers
                    if origin is not None
                ], same_paths=graph):
            self.left(path, module, 'generic', _REACHED)
            rewrite = None
        read = None if rewrite is None else self.attributes_read(
            path, module, rewrite.module)
        if read:
            self.left(path, module, 'generic', read)
            rewrite = None
        if rewrite is not None:
            record = self.merged_record(path, module, 'generic',
                                        rewrite.layers, rewrite.convs)
            record['structure'] = rewrite.structure
            if graph:
                record['code'] = graph_code(rewrite.module)
            self.replace(parent, attr, path, module, rewrite.module, record)
        return True

    def removes_reached(self, block: nn.Module, kept: List[str],
                        same_paths: bool = False) -> bool:
        """Whether a merge of ``block`` keeping only the modules at the
        paths ``kept`` would remove a module that a caller outside the
        block was seen to call, or move it: a kept module deeper than a
        child becomes a child of the merged block under another name
        (``post.act`` as ``post_act``) unless ``same_paths``."""
        called = self.reached.get(id(block))
        if not called:
            return False
        remaining = {
            id(sub)
            for origin in kept if same_paths or '.' not in origin
            for _, sub in walk_modules(block.get_submodule(origin))
        }
        return bool(called - remaining)

    @staticmethod
    def merged_record(path: str, module: nn.Module, rule: str,
                      layers: List[Tuple[str, Optional[str]]],
                      convs: List[Dict]) -> Dict:
        structure = 'conv' if len(layers) == 1 and layers[0][1] is None \
            else 'sequential'
        return {
            'module': path,
            'type': class_path(type(module)),
            'rule': rule,
            'merged': True,
            'structure': structure,
            'layers': [[name, origin] for name, origin in layers],
            'convs': convs
        }

    # -- opt-in deploy methods ---------------------------------------------
    def deploy_methods(self, module: nn.Module, path: str) -> None:
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            child_path = _join(path, name)
            method = _deploy_method(child)
            if method is None:
                self.deploy_methods(child, child_path)
                continue
            changed = copy.deepcopy(child)
            try:
                getattr(changed, method)()
            except Exception as error:  # any error of third-party code
                self.left(child_path, child, f'method:{method}',
                          f'{type(error).__name__}: {error}')
                self.deploy_methods(child, child_path)
                continue
            if _same_state(child, changed):
                self.deploy_methods(child, child_path)
                continue
            changed.train(child.training)
            _carry_attributes(child, changed)
            record = {
                'module': child_path,
                'type': class_path(type(child)),
                'rule': f'method:{method}',
                'merged': True,
                'structure': 'method',
                'method': method
            }
            self.replace(module, name, child_path, child, changed, record)


def _plain_identity(module: nn.Module) -> bool:
    return type(module).forward is nn.Identity.forward and \
        not module._forward_hooks and not module._forward_pre_hooks


def _deploy_method(module: nn.Module) -> Optional[str]:
    """The first of :data:`DEPLOY_METHODS` callable with no argument."""
    for name in DEPLOY_METHODS:
        method = getattr(type(module), name, None)
        if not callable(method):
            continue
        try:
            params = list(inspect.signature(method).parameters.values())[1:]
        except (TypeError, ValueError):
            continue
        if all(p.default is not inspect.Parameter.empty or p.kind in (
                inspect.Parameter.VAR_POSITIONAL,
                inspect.Parameter.VAR_KEYWORD) for p in params):
            return name
    return None


def _same_state(before: nn.Module, after: nn.Module) -> bool:
    """Whether a deploy method left the module as it was."""
    layout = [(n, type(m)) for n, m in before.named_modules()]
    if layout != [(n, type(m)) for n, m in after.named_modules()]:
        return False
    old, new = before.state_dict(), after.state_dict()
    if list(old) != list(new):
        return False
    return all(
        torch.equal(old[k], new[k]) if isinstance(old[k], torch.Tensor)
        else old[k] == new[k] for k in old)


# Outside inference mode: the tensors made are normal ones (parameters
# that inference tensors would keep from autograd later).
@torch.inference_mode(False)
def reparameterize(model: nn.Module,
                   example_inputs: Optional[Sequence] = None,
                   *,
                   call_deploy_methods: bool = False,
                   use_registry: bool = True,
                   verify: bool = True,
                   rtol: Optional[float] = None) -> List[Dict]:
    """Merge the multi-branch blocks of ``model`` into single convs, in place.

    Args:
        model: The model, in eval mode (wrappers are unwrapped).  The model
            object itself is never replaced, only modules under it.
        example_inputs: Positional arguments for ``model(*example_inputs)``;
            when given (and ``verify``), the output is compared before and
            after, and merges that fail the check are undone: off by more
            than ``rtol`` and, where the unmerged model is measured in a
            wider dtype, more than twice as far from that as the unmerged
            model (:class:`mmfuse.verify.OutputCheck`).
        call_deploy_methods: Also run a block's own ``switch_to_deploy``,
            ``reparameterize`` or ``fuse`` method (the first it has that
            needs no argument) where neither an entry nor the generic merge
            applied.
        use_registry: Convert blocks with a :data:`REPARAMETERIZERS` entry
            by it; with ``False`` only the generic merge (and deploy
            methods) run.
        verify: Compare outputs when ``example_inputs`` is given.
        rtol: Largest relative output error accepted; see
            :func:`mmfuse.verify.default_rtol`.

    Returns:
        One dict per block, in model order: ``module`` (path), ``type``
        (class path), ``rule`` (``'generic'``, an entry name or
        ``'method:<name>'``), ``merged`` and, when merged, ``structure``,
        ``layers`` and ``convs`` (geometry and branches of each merged
        conv), else ``reason``.  Verified merges also have
        ``verified_rel_error`` (the merged output's relative error) and,
        where a wider copy was measured, ``verified_against`` (its dtype,
        or why it was not used) and, when used,
        ``verified_precise_rel_error`` (the error against it).  Pass
        the merged ones to :func:`apply_reparam_structure` to rebuild the
        structure.
    """
    model = unwrap_model(model)
    check_eval(model, 're-parameterizing')
    inputs = None if example_inputs is None else as_input_tuple(example_inputs)
    hooks = global_hook_problem()
    if hooks and (inputs is None or not verify):
        # A hook on every conv runs once per branch before, once after.
        raise FusionError(f'mmfuse: cannot re-parameterize: '
                          f'{hooks.replace("not folded", "not merged")}; '
                          'pass example inputs to verify the merges')
    merges = merge_blocks(model, call_deploy_methods, use_registry)
    if verify and inputs is not None and merges.groups:
        tolerance = default_rtol(model) if rtol is None else rtol
        try:
            merges.verify(inputs, merges.unmerged_check(inputs, tolerance))
        except BaseException:  # (Ctrl-C, a check that raised)
            merges.undo_all()  # the model as it was given
            raise
    return merges.records


class Merges:
    """The merges one walk over a model made, to verify and keep or undo.

    Attributes:
        records: One dict per block, as :func:`reparameterize` returns.
        groups: The replacements, in groups that stand or fall together.
    """

    def __init__(self, model: nn.Module, records: List[Dict],
                 groups: List[_Group]):
        self.model = model
        self.records = records
        self.groups = groups

    def unmerged_check(self, inputs: Tuple,
                       tolerance: float) -> OutputCheck:
        """The check against the model's output with every merge undone
        (one forward pass).

        Args:
            inputs: The example inputs.
            tolerance: The largest relative error accepted.
        """
        _undo(self.groups)
        try:
            with torch.no_grad():
                reference = self.model(*fresh_inputs(inputs))
        except BaseException:
            _redo(self.groups)
            raise
        check = output_check(reference, tolerance, 'the merges')
        # (Raised: every merge stays undone, the model as it was given.)
        _redo(self.groups)
        return check

    def undo_all(self) -> None:
        """Put back every merged block (those undone already stay so)."""
        _undo(self.groups)

    def standing(self) -> Tuple[List[nn.Module], List[nn.Module]]:
        """What the merges standing now changed: every module under a
        block they replaced, the block included (whether or not it lives
        on in the replacement, as an activation does), and the
        replacements in the model, the outermost ones (a merged conv, or a
        Sequential of it and the layers after the sum; not one inside a
        block a later merge replaced in turn)."""
        steps = [(old, new) for group in self._standing_groups()
                 for _, _, old, new in group.steps]
        replaced: Dict[int, nn.Module] = {}
        for old, _ in steps:
            replaced.update((id(m), m) for _, m in walk_modules(old))
        present = {id(m) for _, m in walk_modules(self.model)}
        replacements = [new for _, new in steps if id(new) in present]
        inner = {
            id(m)
            for new in replacements for _, m in walk_modules(new)
            if m is not new
        }
        return list(replaced.values()), [
            m for m in replacements if id(m) not in inner
        ]

    def _standing_groups(self) -> List[_Group]:
        """The groups not undone (a group stands or falls whole)."""
        return [
            group for group in self.groups
            if all(parent._modules.get(attr) is new
                   for parent, attr, _, new in group.steps)
        ]

    def measure_unmerged(self, check: OutputCheck, inputs: Tuple) -> None:
        """Have ``check`` measure the model in a wider dtype with every
        merge undone (:meth:`OutputCheck.add_precise`; once), so that
        what changes after the merges is judged from the model as it was
        given; the merges standing are made again."""
        standing = self._standing_groups()
        _undo(standing)
        try:
            check.add_precise(self.model, inputs)
        finally:
            _redo(standing)

    def record_check(self, check: OutputCheck) -> None:
        """Record on each standing merge the check it passed: of the
        output with it (and whatever else changed since the check's
        reference) against the unmerged model's."""
        for record in self.records:
            if record['merged']:
                record['verified_rel_error'] = check.rel_error
                if check.yardstick is not None:
                    record['verified_against'] = check.yardstick
                if check.precise is not None:
                    record['verified_precise_rel_error'] = \
                        check.precise_error

    def _passes(self, inputs: Tuple, check: OutputCheck) -> bool:
        try:
            with torch.no_grad():
                output = self.model(*fresh_inputs(inputs))
        except Exception:  # a merge broke the forward: it counts as wrong
            check.no_output()
            return False
        return check(output)

    def verify(self, inputs: Tuple, check: OutputCheck) -> bool:
        """Keep the merges that keep the output acceptable to ``check``
        (one forward pass of the merged model, more to bisect).

        Args:
            inputs: The example inputs.
            check: Against the model's output with every merge undone
                (:meth:`unmerged_check`, or the reference of a traced pass
                made before merging).

        Returns:
            Whether any merge was undone.
        """
        passed = self._passes(inputs, check)
        if not passed:
            _undo(self.groups)
            # The unmerged model's own rounding may be what failed (see
            # OutputCheck): measure it once in a wider dtype.  If the
            # merged output passes then, every merge stands.
            if check.passes_wider(self.model, inputs):
                _redo(self.groups)
                passed = True
            else:
                self._isolate(inputs, check)
        self.record_check(check)
        return not passed

    def _isolate(self, inputs: Tuple, check: OutputCheck) -> None:
        """With every merge undone (all of them together fail
        ``check``), redo those that keep the output acceptable to it;
        record why the others stay undone."""
        _, bad, dropped, unchecked = isolate_failures(
            self.groups, _redo, _undo, lambda: self._passes(inputs, check),
            search_checks(len(self.groups)))
        failed = ('undone: verification found the output '
                  f'{check.failure("unmerged")} with it')
        unreproducible = ('undone: the output could not be reproduced, '
                          'merged or not')
        not_reached = ('undone: not checked: the search for the merges '
                       'that fail verification stopped after its checks '
                       '(a forward pass each) before this one')
        for groups, reason in ((bad, failed), (dropped, unreproducible),
                               (unchecked, not_reached)):
            for group in groups:
                for record in group.records:
                    record['merged'] = False
                    record['reason'] = reason


def _redo(groups: List[_Group]) -> List[_Group]:
    """Make the replacements of ``groups`` again, in order."""
    for group in groups:
        group.redo()
    return groups


def _undo(groups: List[_Group]) -> None:
    """Undo the replacements of ``groups``, last first."""
    for group in reversed(groups):
        group.undo()


def _registry_entry(module: nn.Module,
                    by_class: Optional[Dict[type, Any]] = None):
    """``(name, entry)`` of the :data:`REPARAMETERIZERS` entry that
    converts ``module``, or ``None`` (always for a module whose forward is
    replaced on the instance: the entry describes its class's).

    Args:
        module: The module.
        by_class: What earlier lookups of one walk found, by class (the
            registry does not change during a walk); filled in here.  Each
            lookup still gets an entry of its own.
    """
    if 'forward' in module.__dict__:
        return None
    if by_class is None:
        return find_reparameterizer(module)
    cls = type(module)
    if cls not in by_class:
        by_class[cls] = find_reparameterizer(module)
    found = by_class[cls]
    return None if found is None else (found[0], type(found[1])())


def has_registered_blocks(model: nn.Module) -> bool:
    """Whether a :data:`REPARAMETERIZERS` entry applies to a module of
    ``model`` (which :func:`merge_blocks` then merges, unless refused)."""
    by_class: Dict[type, Any] = {}
    return any(
        _registry_entry(module, by_class) is not None
        for _, module in walk_modules(model))


def merge_blocks(model: nn.Module,
                 call_deploy_methods: bool = False,
                 use_registry: bool = True,
                 generic_blocks: Optional[Set[int]] = None,
                 reached: Optional[Dict[int, Set[int]]] = None) -> Merges:
    """Merge every block of ``model`` that can be, in place, unverified.

    See :func:`reparameterize` for the arguments; ``model`` is already
    unwrapped and in eval mode.  With ``generic_blocks`` (ids of modules)
    the generic merge tries only those modules (``sum_blocks`` of a
    :class:`~mmfuse.discovery.traced.TracedForward`: the modules that were
    seen summing branches of one value); registry entries apply anywhere.
    ``reached`` (ids of blocks a caller outside them was seen to reach
    into, ``self.block.branch(x)``, with the ids of the modules it called
    there): such a block is merged only where the merge keeps those; by
    default what the code above each block may reach, read from it
    (``discovery.structural.reached_inside``).
    """
    if reached is None:
        # Without a forward pass to show it: what the code above each
        # block may reach inside it.
        reached = reached_inside(model)
    walker = _Walker(model, call_deploy_methods, use_registry,
                     generic_blocks, reached)
    try:
        records = walker.run()
    except BaseException:  # (Ctrl-C, an error out of a later block)
        _undo(walker.groups)
        raise
    return Merges(model, records, walker.groups)


def _rebuild(block: nn.Module, record: Dict) -> nn.Module:
    structure = record['structure']
    # As for the merge: the convs' dtype (float16 convs beside float32
    # norms merge into a float16 conv), else the block's first tensor's.
    like = next((m.weight for m in block.modules()
                 if is_conv_layer(m) and isinstance(
                     getattr(m, 'weight', None), torch.Tensor)), None)
    if like is None:
        like = _first_tensor(block)
    if structure in ('conv', 'sequential'):
        convs = {
            c['name']: build_conv(ConvGeometry.from_dict(c['geometry']),
                                  like=like)
            for c in record['convs']
        }
        layers = [tuple(layer) for layer in record['layers']]
        new = _deploy_sequential(block, convs, layers)
        new.train(block.training)
        return new
    if structure == 'graph':
        modes = {m: m.training for m in block.modules()}
        block.eval()
        try:
            rewrite, reasons = GenericMerger().rewrite(block)
        finally:
            for module, mode in modes.items():
                module.training = mode
        if rewrite is None:
            raise FusionError(f"mmfuse: cannot rebuild '{record['module']}'"
                              f": {'; '.join(reasons) or 'no branch sum'}")
        _check_same_convs(record, rewrite)
        code = graph_code(rewrite.module)
        if 'code' in record and record['code'] != code:
            raise FusionError(
                f"mmfuse: '{record['module']}' traces into another graph "
                'than the fused model\'s (its forward reads values that '
                'differ here, a flag held in a tensor?): load the fused '
                'state dict first, or fuse again')
        rewrite.module.train(block.training)
        return rewrite.module
    if structure == 'method':
        getattr(block, record['method'])()
        return block
    raise FusionError(f'mmfuse: unknown re-parameterized structure '
                      f'{structure!r}')


def graph_code(module: nn.Module) -> str:
    """The Python code of a merged block's ``GraphModule``: what it runs
    after the merged convs, which a rebuild must give again (a dtype the
    forward read from a tensor is a constant in it: a block fused in
    bfloat16 rebuilds in a bfloat16 model).  A device read so is named
    alike on every device: a block fused on the CPU rebuilds where a
    runner has moved the model, with that device."""
    return _DEVICE.sub('device(...)', module.code.strip())


_DEVICE = re.compile(r"device\(type='[^']*'(?:, index=\d+)?\)")


def _check_same_convs(record: Dict, rewrite: BlockRewrite) -> None:
    want = [(c['name'], c['geometry']) for c in record['convs']]
    got = [(c['name'], c['geometry']) for c in rewrite.convs]
    if want != got:
        raise FusionError(f"mmfuse: '{record['module']}' merges into "
                          f'{got}, the record says {want}')


def apply_reparam_structure(model: nn.Module,
                            records: Sequence[Dict]) -> nn.Module:
    """Give a freshly built model the structure :func:`reparameterize` made.

    Only the structure: merged convs get default values, to be overwritten
    by ``model.load_state_dict`` with a state dict saved after
    re-parameterization.  Works in train or eval mode.

    Args:
        model: A model built from the same config as the re-parameterized
            one (wrappers are unwrapped).
        records: What :func:`reparameterize` returned (records that were
            not merged are ignored).

    Returns:
        ``model``, changed in place.

    Raises:
        FusionError: When a record does not fit the model.
    """
    inner = unwrap_model(model)
    for record in records:
        if not record.get('merged'):
            continue
        path = record['module']
        if not path:
            raise FusionError('mmfuse: a record replaces the model itself')
        try:
            block = inner.get_submodule(path)
        except AttributeError as error:
            raise FusionError(f"mmfuse: no module '{path}' to rebuild: "
                              f'{error}') from error
        if class_path(type(block)) != record['type']:
            raise FusionError(
                f"mmfuse: '{path}' is a {class_path(type(block))}, the "
                f"record was made for a {record['type']}")
        new = _rebuild(block, record)
        _carry_attributes(block, new)
        parent_path, _, attr = path.rpartition('.')
        parent = inner.get_submodule(parent_path) if parent_path else inner
        parent._modules[attr] = new
    return model
