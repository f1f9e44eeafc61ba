"""The canonical expression label set shared by data, model and service."""

# Order is the model's output order; never reorder (weights depend on it).
EXPRESSIONS: tuple[str, ...] = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger")
NEUTRAL = EXPRESSIONS.index("neutral")

# Dataset spellings -> canonical label. "contempt" is deliberately absent: it is
# kept as a flag in the manifests and excluded from the 7-class tasks.
ALIASES: dict[str, str] = {
    "neutral": "neutral",
    "happy": "happy", "happiness": "happy",
    "sad": "sad", "sadness": "sad",
    "surprise": "surprise", "surprised": "surprise",
    "fear": "fear", "fearful": "fear",
    "disgust": "disgust", "disgusted": "disgust",
    "anger": "anger", "angry": "anger",
}


def canonical(label: str) -> str | None:
    """Canonical name of a dataset label, or None (contempt, unknown)."""
    return ALIASES.get(label.strip().lower())
