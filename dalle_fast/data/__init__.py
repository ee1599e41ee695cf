"""Datasets: built-in captioned shapes (with a rule-based scorer), image folders, tar shards."""
from .folder import ImageFolderDataset
from .shapes import Description, Scene, ShapesDataset, parse_caption, score

__all__ = ["Description", "ImageFolderDataset", "Scene", "ShapesDataset", "parse_caption", "score"]
