"""Faces: detection (MTCNN), 5-point alignment, dlib chips, the frozen identity
encoder (a port of dlib's ResNet), pose pseudo-labels, and `preprocess`, the one
path from an image to model input. The public surface, re-exported here:"""
from model.faces.align import (CANONICAL_LANDMARKS, DLIB_CHIP_LANDMARKS, align_face, dlib_chip,
                               dlib_chip_transform, expression_regions, identity_chip,
                               similarity_transform)
from model.faces.detect import Detection, FaceDetector, largest_face
from model.faces.preprocess import (SOURCE_DETECTED, SOURCE_FALLBACK, SOURCE_PADDED, CropLocator, Face,
                                    FacePipeline, Faces, center_landmarks, fallback_landmarks,
                                    identity_input, to_model_input, to_uint8)

__all__ = [
    "CANONICAL_LANDMARKS", "DLIB_CHIP_LANDMARKS", "align_face", "dlib_chip", "dlib_chip_transform",
    "expression_regions", "identity_chip", "similarity_transform",
    "Detection", "FaceDetector", "largest_face",
    "SOURCE_DETECTED", "SOURCE_FALLBACK", "SOURCE_PADDED", "CropLocator", "Face", "FacePipeline", "Faces",
    "center_landmarks", "fallback_landmarks", "identity_input", "to_model_input", "to_uint8",
]
