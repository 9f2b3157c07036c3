"""Self-training labels of a composition of regimes: one rule per regime, combined per sample in one place.

:class:`~lightning_weakseg.callbacks.PseudoLabelRefresh` calls ``make_pseudo_labels(batch)``. Each regime that
can label its samples declares a :class:`PseudoLabelRule` in its class body; :class:`PseudoLabelMixin` (a base
of those regimes, present once in any composition) decides for every sample which rule labels it:

1. a sample is claimed by the rules whose label it carries (its ``has_<key>`` flag);
2. claimed by several, it takes the rule with the highest ``priority``: scribble (30: the scribbled pixels are
   kept as they are), tags (20: only the tagged classes are labelled), points (10);
3. claimed by none (a sample with a full mask or boxes only), it takes the rule with the lowest priority — the
   point rule in :class:`~lightning_weakseg.regimes.MixedSegModule` (the dense-CRF-refined prediction, which
   needs nothing but the image); in a one-regime module, that regime's rule.

A regime's pseudo-label term (``tags/pseudo``) uses :meth:`PseudoLabelMixin.pseudo_label_owners` to train only on
the samples whose labels its own rule makes.

The order of the bases plays no part: two compositions of the same regimes in different orders give the same
labels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch

from ..data.batch import IGNORE_INDEX, complete_flags

__all__ = ["PseudoLabelRule", "PseudoLabelMixin"]


@dataclass(frozen=True)
class PseudoLabelRule:
    """How one regime makes pseudo labels.

    Args:
        name: the rule's name (``"scribble"``, ``"points"``, ``"tags"``); a subclass that declares a rule of the
            same name replaces its parent's.
        key: the label key whose ``has_<key>`` flag marks the samples the rule is for, or a function of the
            module that returns it (``operator.attrgetter("scribble_key")`` for a configurable key).
        make: name of the module's method ``(batch) -> long (B, H, W)`` (class ids, 255 = unknown) that labels
            every sample of the batch by this rule.
        priority: a sample that carries the labels of several rules takes the one with the highest priority.
    """

    name: str
    key: Union[str, Callable[[object], str]]
    make: str
    priority: int

    def key_of(self, module) -> str:
        return self.key if isinstance(self.key, str) else self.key(module)


class PseudoLabelMixin:
    """``make_pseudo_labels`` for every composition of regimes that declare a ``pseudo_label_rule``: each sample is
    labelled by the rule of the label it carries (module docstring: claims, priority, samples no rule claims)."""

    def pseudo_label_rules(self) -> list[PseudoLabelRule]:
        """The rules of the composed regimes, highest priority first (ties: by name)."""
        rules: dict[str, PseudoLabelRule] = {}
        for cls in type(self).__mro__:
            rule = cls.__dict__.get("pseudo_label_rule")
            if isinstance(rule, PseudoLabelRule) and rule.name not in rules:  # the most derived declaration wins
                rules[rule.name] = rule
        return sorted(rules.values(), key=lambda r: (-r.priority, r.name))

    def pseudo_label_owners(self, batch: dict) -> dict[str, torch.Tensor]:
        """Which rule labels each sample: ``{rule name: bool (B,)}``, a partition of the batch."""
        rules = self.pseudo_label_rules()
        x = batch["image"]
        b = x.shape[0]
        free = torch.ones(b, dtype=torch.bool, device=x.device)
        owners: dict[str, torch.Tensor] = {}
        for rule in rules:
            key = rule.key_of(self)
            has = batch.get(f"has_{key}") if batch.get(key) is not None else None
            claims = free.new_zeros(b) if has is None else has.to(x.device).bool()
            owners[rule.name] = claims & free
            free = free & ~claims
        if rules:
            owners[rules[-1].name] = owners[rules[-1].name] | free
        return owners

    def make_pseudo_labels(self, batch: dict) -> torch.Tensor:
        """Self-training labels, long (B, H, W) (class ids, 255 = unknown): each sample's from the rule that
        :meth:`pseudo_label_owners` gives it. A rule that labels no sample of the batch is not run."""
        rules = self.pseudo_label_rules()
        if not rules:
            raise AttributeError(f"{type(self).__name__} composes no regime with a pseudo_label_rule, so it has no "
                                 "make_pseudo_labels(batch)")
        batch = complete_flags(dict(batch))  # a plain user batch without has_* flags: every sample carries its keys
        owners = self.pseudo_label_owners(batch)
        x = batch["image"]
        lab = torch.full((x.shape[0], *x.shape[2:]), IGNORE_INDEX, dtype=torch.long, device=self.device)
        for rule in rules:
            who = owners[rule.name].to(lab.device)
            if bool(who.any()):
                made = getattr(self, rule.make)(batch).to(lab.device).long()
                lab = torch.where(who[:, None, None], made, lab)
        return lab
