"""Oxford Flowers102 class names (Nilsback & Zisserman 2008), indexed by official class number - 1.

The Hub copy `nelorth/oxford-flowers` names its labels with the official class numbers as strings, sorted
lexicographically ('1', '10', '100', ...), so its label index i is NOT class i+1: use `official_class_number`.
"""

from __future__ import annotations

FLOWER_NAMES = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot",
    "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily",
    "balloon flower", "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william",
    "carnation", "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya",
    "cape flower", "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily",
    "poinsettia", "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium",
    "orange dahlia", "pink-yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan",
    "silverbush", "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower",
    "tree poppy", "gazania", "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower",
    "lotus", "toad lily", "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose",
    "tree mallow", "magnolia", "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss",
    "foxglove", "bougainvillea", "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower",
    "trumpet creeper", "blackberry lily",
)
assert len(FLOWER_NAMES) == 102


def official_class_number(label_name: str) -> int:
    """The official Flowers102 class number (1..102) of a label name of the Hub copy."""
    return int(label_name)


def display_names(label_names: list[str]) -> list[str]:
    """Flower names in the dataset's label-index order; label names that are not class numbers stay as they are."""
    return [
        FLOWER_NAMES[int(n) - 1] if str(n).isdigit() and 1 <= int(n) <= 102 else str(n) for n in label_names
    ]
