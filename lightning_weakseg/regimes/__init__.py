"""lightning_weakseg.regimes"""
from .boxes import BoxTightnessMixin, BoxSegModule
from .points import PointVoronoiMixin, PointSegModule
from .coteaching import CoTeachingMixin, CoTeachingSegModule
from .robust import RobustLossMixin, RobustSegModule
