"""A vision-language model suite: timm vision towers, connectors, any Hugging Face causal LLM."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .config import VLMConfig
from .masks import ATTENTION_MODES
from .modeling import VisionLanguageModel
from .processing import VLMProcessor
from .roles import TokenRole

AutoConfig.register("vlm", VLMConfig)
AutoModel.register(VLMConfig, VisionLanguageModel)
AutoModelForImageTextToText.register(VLMConfig, VisionLanguageModel)

__all__ = ["VLMConfig", "VisionLanguageModel", "VLMProcessor", "TokenRole", "ATTENTION_MODES"]
