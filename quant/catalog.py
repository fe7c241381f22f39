"""The names quantization is configured with, torch-free: the types, the recipes, the embeddings choices and
their checks, so that a command line can offer them without loading torch. `quant.formats` defines each
type's layout (FORMATS, in the same order as TYPES) and `quant.recipe` what a recipe does."""

from __future__ import annotations

from lbdl_cli.errors import ConfigError

TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q5_k", "q4_k", "nf4", "nf4_dq")
RECIPES = {
    "pure": "every linear layer gets the base type",
    "s": "attention V gets the next type up",
    "m": "attention V and the feed-forward down projection get the next type up",
    "l": "attention V and every feed-forward weight get the next type up",
}
DEFAULT_EMBEDDINGS = "q8_0"
EMBEDDING_CHOICES = ("keep", "same")


class QuantError(ConfigError):
    """A tensor or a type that cannot be quantized: the message names it and the fix."""


def type_name(name: str) -> str:
    """A type's name (case-insensitive); the error lists the valid ones."""
    t = str(name).lower()
    if t not in TYPES:
        raise QuantError(f"unknown quantization type {name!r}; valid types: {', '.join(TYPES)}")
    return t


def check_recipe(recipe: str) -> str:
    r = str(recipe).lower()
    if r not in RECIPES:
        raise QuantError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(RECIPES)}")
    return r


def check_embeddings(embeddings: str) -> str:
    e = str(embeddings).lower()
    if e not in EMBEDDING_CHOICES and e not in TYPES:
        raise QuantError(f"unknown embeddings type {embeddings!r}; valid: {', '.join(EMBEDDING_CHOICES + TYPES)}")
    return e
