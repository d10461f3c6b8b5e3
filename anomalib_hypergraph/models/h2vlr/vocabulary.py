"""Words of H2VLR's prompts: normal and generic anomaly states, and class-specific defect states (S-prompts).

The Special group names defect states of the object class. For the categories of MVTec AD, VisA and MVTec 3D-AD the
states below paraphrase the defect types these datasets document for each category (prior knowledge about a product,
as an inspector would write it down; no image of any split is read). Any other class name (e.g. a ``Folder``
dataset) falls back to :data:`GENERIC_DEFECT_STATES`. Category names are matched case- and separator-blind
(``metal_nut`` = ``Metal Nut``); :func:`object_name` turns a category into the words used in the prompts.
"""

from __future__ import annotations

import re

# Normal states (REFERENCES 2: the templates in common use); "{}" is the object name.
NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

# Global group: generic anomaly states.
GLOBAL_ANOMALY_STATES = (
    "damaged {}",
    "flawed {}",
    "abnormal {}",
    "imperfect {}",
    "blemished {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
    "broken {}",
)

# Special-group fallback for class names without a known defect vocabulary.
GENERIC_DEFECT_STATES = (
    "{} with a scratch",
    "{} with a crack",
    "{} with a hole",
    "{} with a stain",
    "{} with contamination",
    "{} with a missing part",
    "deformed {}",
)

# Words for categories whose folder name is not what the object is called.
OBJECT_NAMES = {
    "metal_nut": "metal nut",
    "chewinggum": "chewing gum",
    "macaroni1": "macaroni",
    "macaroni2": "macaroni",
    "pcb1": "printed circuit board",
    "pcb2": "printed circuit board",
    "pcb3": "printed circuit board",
    "pcb4": "printed circuit board",
    "pipe_fryum": "pipe fryum",
    "cable_gland": "cable gland",
}

# Class-specific defect states. MVTec AD (15 categories).
_MVTEC_AD = {
    "bottle": ("{} with a large breakage", "{} with a small breakage", "{} with contamination"),
    "cable": (
        "{} with a bent wire",
        "{} with swapped cables",
        "{} with a cut inner insulation",
        "{} with a cut outer insulation",
        "{} with a missing cable",
        "{} with a missing wire",
        "{} with a poked insulation",
    ),
    "capsule": ("{} with a crack", "{} with a faulty imprint", "{} with a poke", "{} with a scratch", "squeezed {}"),
    "carpet": (
        "{} with a color stain",
        "{} with a cut",
        "{} with a hole",
        "{} with metal contamination",
        "{} with a thread",
    ),
    "grid": ("bent {}", "broken {}", "{} with glue", "{} with metal contamination", "{} with a thread"),
    "hazelnut": ("{} with a crack", "{} with a cut", "{} with a hole", "{} with a print"),
    "leather": ("{} with a color stain", "{} with a cut", "{} with a fold", "{} with glue", "{} with a poke"),
    "metal_nut": ("bent {}", "{} with a color stain", "flipped {}", "{} with a scratch"),
    "pill": (
        "{} with a color stain",
        "{} with contamination",
        "{} with a crack",
        "{} with a faulty imprint",
        "{} of the wrong type",
        "{} with a scratch",
    ),
    "screw": (
        "{} with a manipulated front",
        "{} with a scratched head",
        "{} with a scratched neck",
        "{} with a damaged thread side",
        "{} with a damaged thread top",
    ),
    "tile": (
        "{} with a crack",
        "{} with a glue strip",
        "{} with a gray stroke",
        "{} with oil",
        "{} with a rough surface",
    ),
    "toothbrush": ("{} with defective bristles", "{} with missing bristles"),
    "transistor": ("{} with a bent lead", "{} with a cut lead", "{} with a damaged case", "misplaced {}"),
    "wood": ("{} with a color stain", "{} with a hole", "{} with a liquid stain", "{} with a scratch"),
    "zipper": (
        "{} with broken teeth",
        "{} with a damaged fabric border",
        "{} with a damaged fabric interior",
        "{} with rough teeth",
        "{} with split teeth",
        "{} with squeezed teeth",
    ),
}

# VisA (12 categories).
_VISA = {
    "candle": (
        "{} with a chunk of wax missing",
        "{} with a damaged corner of packaging",
        "{} with a different colour spot",
        "{} with foreign particles",
        "{} with wax melted out",
        "{} with a weird wick",
    ),
    "capsules": ("{} with a bubble", "discoloured {}", "{} with a scratch", "leaking {}", "misshapen {}"),
    "cashew": (
        "burnt {}",
        "{} with a broken corner or edge",
        "{} with a different colour spot",
        "{} with small holes",
        "{} with small scratches",
        "{} with a same colour spot",
        "{} stuck together",
    ),
    "chewinggum": (
        "{} with a chunk missing",
        "{} with a corner missing",
        "{} with scratches",
        "{} with a similar colour spot",
    ),
    "fryum": (
        "burnt {}",
        "{} with a broken corner or edge",
        "{} with a different colour spot",
        "{} stuck together",
        "{} broken in the middle",
        "{} with a similar colour spot",
        "{} with small scratches",
    ),
    "macaroni1": (
        "{} with a chip around the edge",
        "{} with a different colour spot",
        "{} broken in the middle",
        "{} with a similar colour spot",
        "{} with small cracks",
        "{} with small scratches",
    ),
    "macaroni2": (
        "{} broken down the middle",
        "{} with a similar colour spot",
        "{} with a different colour spot",
        "{} with a small chip around the edge",
        "{} with small cracks",
        "{} with small scratches",
    ),
    "pcb1": ("{} with a bent pin", "{} with a melted part", "{} with a missing part", "{} with a scratch"),
    "pcb2": ("{} with a bent pin", "{} with a melted part", "{} with a missing part", "{} with a scratch"),
    "pcb3": ("{} with a bent pin", "{} with a melted part", "{} with a missing part", "{} with a scratch"),
    "pcb4": (
        "{} with a burnt part",
        "{} with damage",
        "{} with an extra part",
        "{} with a missing part",
        "{} with a scratch",
        "{} with a part in the wrong place",
    ),
    "pipe_fryum": (
        "burnt {}",
        "{} with a broken corner or edge",
        "{} with a different colour spot",
        "{} broken in the middle",
        "{} with a similar colour spot",
        "{} with small scratches",
    ),
}

# MVTec 3D-AD (10 categories).
_MVTEC_3D = {
    "bagel": ("{} with contamination", "{} with a crack", "{} with a hole"),
    "cable_gland": ("bent {}", "{} with a crack", "{} with a cut", "{} with a hole", "{} with a damaged thread"),
    "carrot": ("{} with contamination", "{} with a crack", "{} with a cut", "{} with a hole"),
    "cookie": ("{} with contamination", "{} with a crack", "{} with a hole"),
    "dowel": ("bent {}", "{} with contamination", "{} with a cut"),
    "foam": ("{} with a color stain", "{} with contamination", "{} with a cut"),
    "peach": ("{} with contamination", "{} with a cut", "{} with a hole"),
    "potato": ("{} with contamination", "{} with a cut", "{} with a hole"),
    "rope": ("{} with contamination", "{} with a cut", "opened {}"),
    "tire": ("{} with contamination", "{} with a cut", "{} with a hole"),
}

CLASS_DEFECT_STATES: dict[str, tuple[str, ...]] = {**_MVTEC_AD, **_VISA, **_MVTEC_3D}


def canonical_class(name: str) -> str:
    """Lower-case, separator-blind key of a class name (``"Metal Nut"`` and ``"metal-nut"`` -> ``"metal_nut"``)."""
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def object_name(class_name: str) -> str:
    """Return the words that stand for the object in prompts (``pcb1`` -> ``printed circuit board``)."""
    key = canonical_class(class_name)
    return OBJECT_NAMES.get(key, key.replace("_", " ")) or "object"


def special_states(class_name: str) -> tuple[str, ...]:
    """Class-specific defect states of ``class_name``, or the generic fallback for an unknown class."""
    return CLASS_DEFECT_STATES.get(canonical_class(class_name), GENERIC_DEFECT_STATES)


def has_special_states(class_name: str) -> bool:
    """Whether ``class_name`` is one of the MVTec AD / VisA / MVTec 3D-AD categories with its own defect states."""
    return canonical_class(class_name) in CLASS_DEFECT_STATES
