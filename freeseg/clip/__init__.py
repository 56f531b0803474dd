"""CLIP from scratch: OpenAI's tokenizer, model (state-dict compatible) and checkpoint loader."""

from freeseg.clip.load import load, preprocess_transform
from freeseg.clip.model import CLIP, CLIP_MEAN, CLIP_STD, build_model, normalize_pixels
from freeseg.clip.tokenizer import Tokenizer, default_tokenizer, learn_bpe, tokenize

__all__ = ["CLIP", "CLIP_MEAN", "CLIP_STD", "Tokenizer", "build_model", "default_tokenizer", "learn_bpe",
           "load", "normalize_pixels", "preprocess_transform", "tokenize"]
