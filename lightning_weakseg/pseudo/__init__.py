"""Offline pseudo-label makers (NumPy/SciPy/OpenCV allowed; never called inside a training step)."""
from .points import voronoi_labels, cluster_labels, point_labels, voronoi_cells
from .dense_crf import dense_crf
from .grabcut import box_masks, grabcut_mask, grabcut_masks, pseudo_labels_from_boxes
from .cam_refine import affinity_random_walk, cam_to_pseudo, cams_to_probs, crf_refine_cams

__all__ = ["voronoi_labels", "cluster_labels", "point_labels", "voronoi_cells", "dense_crf", "box_masks",
           "grabcut_mask", "grabcut_masks", "pseudo_labels_from_boxes", "affinity_random_walk", "cam_to_pseudo",
           "cams_to_probs", "crf_refine_cams"]
