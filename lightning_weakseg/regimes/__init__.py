"""Regimes: one mixin per kind of weak label, composed with :class:`~lightning_weakseg.WeakSegModule` by
inheritance. A mixin adds named loss terms (``loss_terms``); shared state and shared decisions have one owner:
:class:`BarrierMixin` (the log-barrier t), :class:`PseudoLabelMixin` (whose rule labels which sample), and
``WeakSegModule.replaces_base_term`` (a regime that trains on the base label map itself). The semi-supervised regimes
(:class:`MeanTeacherMixin`, :class:`CrossPseudoSupervisionMixin`) add terms for images without any label and
compose with every other regime; the two-network regimes share :class:`PeerNetworkMixin`."""
from ._barrier import BarrierMixin
from ._pseudo import PseudoLabelMixin, PseudoLabelRule
from .boxes import BoxTightnessMixin, BoxSegModule
from .points import PointVoronoiMixin, PointSegModule
from ._peer import PeerNetworkMixin
from .coteaching import CoTeachingMixin, CoTeachingSegModule
from .cps import CPSSegModule, CrossPseudoSupervisionMixin
from .mean_teacher import MeanTeacherMixin, MeanTeacherSegModule
from .robust import RobustLossMixin, RobustSegModule
from .scribbles import ScribbleMixin, ScribbleSegModule
from .mixed import MixedSegModule
from .tags import ImageLevelMixin, TagSegModule

__all__ = ["BarrierMixin", "PseudoLabelMixin", "PseudoLabelRule",
           "BoxTightnessMixin", "BoxSegModule", "PointVoronoiMixin", "PointSegModule",
           "PeerNetworkMixin", "CoTeachingMixin", "CoTeachingSegModule",
           "MeanTeacherMixin", "MeanTeacherSegModule", "CrossPseudoSupervisionMixin", "CPSSegModule",
           "RobustLossMixin", "RobustSegModule",
           "ScribbleMixin", "ScribbleSegModule", "MixedSegModule", "ImageLevelMixin", "TagSegModule"]
