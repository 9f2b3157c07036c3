"""lightning_weakseg.regimes"""
from .boxes import BoxTightnessMixin, BoxSegModule
from .points import PointVoronoiMixin, PointSegModule
from .coteaching import CoTeachingMixin, CoTeachingSegModule
from .robust import RobustLossMixin, RobustSegModule
from .scribbles import ScribbleMixin, ScribbleSegModule
from .mixed import MixedSegModule
from .tags import ImageLevelMixin, TagSegModule
