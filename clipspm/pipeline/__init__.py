"""The network: OTAM, Semantic Fusion, HSMR, prompt generator, SPM, PADM, losses, baselines,
the CLIP-SPM head, and the Episode batch with the one episode step that assembles the loss."""

from clipspm.pipeline.baselines import CLIPFSARHead, ProtoNetHead
from clipspm.pipeline.episode import AUX_LOSS_WEIGHTS, Episode, HeadOutput, StepResult, episode_step
from clipspm.pipeline.hsmr import HSMR, MotionFeatureExtractor
from clipspm.pipeline.losses import condis, video_text_loss
from clipspm.pipeline.model import HEAD_KINDS, CLIPSPMHead, build_head
from clipspm.pipeline.otam import frame_distances, otam_cumulative, otam_cumulative_recursive, otam_distance
from clipspm.pipeline.padm import PADMOutput, PrototypeAnchorDualModulation
from clipspm.pipeline.prompt_generator import PromptGenerator
from clipspm.pipeline.semantic_fusion import MAX_FRAMES, SemanticFusion, TransformerLayer
from clipspm.pipeline.spm import SemanticPrototypeModulation, SPMOutput

__all__ = [
    "AUX_LOSS_WEIGHTS",
    "HEAD_KINDS",
    "HSMR",
    "MAX_FRAMES",
    "CLIPFSARHead",
    "CLIPSPMHead",
    "Episode",
    "HeadOutput",
    "MotionFeatureExtractor",
    "PADMOutput",
    "PromptGenerator",
    "ProtoNetHead",
    "PrototypeAnchorDualModulation",
    "SPMOutput",
    "SemanticFusion",
    "SemanticPrototypeModulation",
    "StepResult",
    "TransformerLayer",
    "build_head",
    "condis",
    "episode_step",
    "frame_distances",
    "otam_cumulative",
    "otam_cumulative_recursive",
    "otam_distance",
    "video_text_loss",
]
