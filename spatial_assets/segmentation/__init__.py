"""SpatialScope step 1: nuclei segmentation of the H&E image and assignment of nuclei to spots.

Methods
-------
* ``stardist``: StarDist2D (Schmidt et al. 2018). ``params.model`` is a StarDist registry name (default
  ``2D_versatile_he``, downloaded once and cached by StarDist; needs the internet the first time) or a local StarDist
  model folder (``config.json`` + ``*.h5`` weights). A 3-channel model sees the RGB image, a 1-channel model the
  hematoxylin channel of colour deconvolution (``skimage.color.rgb2hed``) or the luminance. Input normalised as in
  StarDist's examples (percentiles 1 / 99.8, jointly over channels). ``params.scale`` rescales for prediction.
  Bundled models (``bundled:<name>``): ``stardist_he`` (:data:`BUNDLED_HE_MODEL`, RGB H&E, trained here on H&E
  renders of real nuclear masks, ``python -m spatial_assets.segmentation train-he``; run it with
  ``prob_thresh: null`` / ``nms_thresh: null``, its own thresholds) and ``stardist_nuclei``
  (:data:`BUNDLED_MODEL`, 1 channel, fluorescence-like nuclei; on real H&E it outlines tissue texture).
* ``watershed``: squidpy's ``im.segment(method='watershed')`` on the (smoothed, normalised) hematoxylin channel,
  with one Otsu threshold for the whole image (squidpy would otherwise pick one per chunk); needs no weights.
  ``channel: gray`` uses the inverted luminance there (nuclei must be bright); for a 1-channel StarDist model
  ``gray`` is the plain luminance (``skimage.color.rgb2gray``).

Large images are never loaded twice: any array-like (numpy, ``zarr.Array``, tifffile memmap) is read block-wise;
the hematoxylin channel is computed per block; above ``big_pixels`` pixels StarDist runs ``predict_instances_big``
and writes labels block-wise into a numpy array or a given ``zarr`` array (``labels_out``). The nuclei table is
computed from the labels by block-wise ``np.bincount`` (linear memory).

Nucleus features (:func:`nucleus_features`, columns :data:`FEATURE_COLUMNS`): area, eccentricity, axis ratio,
solidity (``skimage.measure.regionprops_table``), and the mean, sd and skewness of the hematoxylin optical density
plus two texture statistics (fine-scale contrast, gradient magnitude) by per-label ``np.bincount``; added to the
cells table by :func:`segment_sample` (``params.nucleus_features``), read by cell typing's morphology labels.

Cap warning: when more than ``params.max_capped_fraction`` of the QC-passing spots hold more nuclei than
``params.max_cells_per_spot`` (cells over the cap are dropped), :func:`assign_cells_to_spots` warns
(:class:`CellCapWarning` and the log) and its summary carries ``cap_warning`` (None otherwise).
"""

from ._channels import ChannelView, as_rgb_image, hematoxylin
from ._evaluation import match_f1, matched_true_labels
from ._features import FEATURE_COLUMNS, nucleus_features
from ._models import (
    BUNDLED_HE_MODEL,
    BUNDLED_MODEL,
    ModelUnavailableError,
    bundled_models,
    load_stardist_model,
    validate_model_folder,
)
from ._nuclei import SegmentationResult, nuclei_table, segment_nuclei
from ._sample import SampleCells, segment_sample
from ._spots import (
    CellCapWarning,
    assign_cells_to_spots,
    cap_report,
    check_image_covers_spots,
    segment_slide,
    spot_diameter_px,
)

__all__ = [
    "BUNDLED_HE_MODEL",
    "BUNDLED_MODEL",
    "CellCapWarning",
    "cap_report",
    "FEATURE_COLUMNS",
    "nucleus_features",
    "ChannelView",
    "SampleCells",
    "segment_sample",
    "bundled_models",
    "ModelUnavailableError",
    "SegmentationResult",
    "as_rgb_image",
    "assign_cells_to_spots",
    "check_image_covers_spots",
    "hematoxylin",
    "load_stardist_model",
    "match_f1",
    "matched_true_labels",
    "nuclei_table",
    "segment_nuclei",
    "segment_slide",
    "spot_diameter_px",
    "validate_model_folder",
]
