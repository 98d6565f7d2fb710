"""The network: OTAM, Semantic Fusion, HSMR, prompt generator, SPM, PADM, losses, the Episode batch with
the one episode step that assembles the loss, and the few-shot methods built from them (`methods/`)."""

from clipspm.pipeline.episode import AUX_LOSS_WEIGHTS, Episode, HeadOutput, StepResult, class_prototypes, episode_step
from clipspm.pipeline.hsmr import HSMR, MotionFeatureExtractor
from clipspm.pipeline.losses import condis, video_text_loss
from clipspm.pipeline.methods import build_head, get_method, methods
from clipspm.pipeline.otam import frame_distances, otam_cumulative, otam_cumulative_recursive, otam_distance
from clipspm.pipeline.padm import PADMOutput, PrototypeAnchorDualModulation
from clipspm.pipeline.prompt_generator import PromptGenerator
from clipspm.pipeline.semantic_fusion import MAX_FRAMES, SemanticFusion, TransformerLayer
from clipspm.pipeline.spm import SemanticPrototypeModulation, SPMOutput

__all__ = [
    "AUX_LOSS_WEIGHTS",
    "HSMR",
    "MAX_FRAMES",
    "Episode",
    "HeadOutput",
    "MotionFeatureExtractor",
    "PADMOutput",
    "PromptGenerator",
    "PrototypeAnchorDualModulation",
    "SPMOutput",
    "SemanticFusion",
    "SemanticPrototypeModulation",
    "StepResult",
    "TransformerLayer",
    "build_head",
    "class_prototypes",
    "condis",
    "episode_step",
    "frame_distances",
    "get_method",
    "methods",
    "otam_cumulative",
    "otam_cumulative_recursive",
    "otam_distance",
    "video_text_loss",
]
