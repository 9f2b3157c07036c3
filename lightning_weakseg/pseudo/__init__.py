"""lightning_weakseg.pseudo"""
from .points import voronoi_labels, cluster_labels, point_labels, voronoi_cells
from .dense_crf import dense_crf
from .grabcut import box_masks, grabcut_mask, grabcut_masks, pseudo_labels_from_boxes
