"""What a dataset run will generate: the class list and one (prompt, classes) per global index.

Item ``i`` is a pure function of the plan and ``i``: class ``i % K`` (strided, so a run stopped
early still covers every class evenly), template ``(i // K) % T``. Prompts from a file name their
classes explicitly and are cycled the same way.
"""

import dataclasses
import json
from pathlib import Path

from jaxmask.labels import VOC_CLASSES
from ports.toyworld import scenes

PRESETS: dict[str, tuple[str, ...]] = {
    "voc": VOC_CLASSES,
    # Cityscapes' human and vehicle classes (the DiffuMask / SeeDiff evaluation subset)
    "cityscapes": ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"),
    # the toy world's shapes: what the bundled model can draw
    "shapes": scenes.CLASSES,
}
# Default templates per preset where "a photo of a {class}" is not the model's language: the toy
# world's caption grammar, one template per background kind.
PRESET_TEMPLATES: dict[str, tuple[str, ...]] = {
    "shapes": tuple(
        f"a {{class}} on a {word} background" for word in scenes.BACKGROUND_WORDS.values()
    ),
}
_NOT_PRESETS = ("pascal", "pascal_voc", "voc2012", "coco", "ade20k", "ade", "cityscapes19", "lvis")
DEFAULT_TEMPLATE = "a photo of a {class}"
# VOC's run-together names read as words in prompts
SPOKEN = {
    "aeroplane": "aeroplane",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
    "motorbike": "motorbike",
}


@dataclasses.dataclass(frozen=True)
class Item:
    prompt: str
    classes: tuple[str, ...]  # the dataset class names present, in label order of the prompt
    words: tuple[str, ...]  # the word(s) of each class as written in the prompt


@dataclasses.dataclass(frozen=True)
class Plan:
    classes: tuple[str, ...]  # dataset class names; label id = position + 1
    items_per_class: int
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    prompts: tuple[tuple[str, tuple[str, ...]], ...] = ()  # explicit (prompt, classes) pairs

    @property
    def total(self) -> int:
        return self.items_per_class * len(self.classes)

    def id2label(self) -> dict[int, str]:
        return {0: "background", **{i + 1: c for i, c in enumerate(self.classes)}}

    def item(self, global_index: int) -> Item:
        if not 0 <= global_index < self.total:
            raise IndexError(f"item {global_index} is outside the plan's {self.total} items")
        if self.prompts:
            prompt, names = self.prompts[global_index % len(self.prompts)]
            return Item(prompt, names, tuple(spoken(n) for n in names))
        k = len(self.classes)
        name = self.classes[global_index % k]
        template = self.templates[(global_index // k) % len(self.templates)]
        word = spoken(name)
        return Item(template.replace("{class}", word), (name,), (word,))

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        """The plan :meth:`to_json` wrote."""
        return cls(
            classes=tuple(data["classes"]),
            items_per_class=int(data["items_per_class"]),
            templates=tuple(data["templates"]),
            prompts=tuple((p, tuple(c)) for p, c in data["prompts"]),
        )

    def extends(self, old: "Plan") -> bool:
        """Whether this plan keeps every item of ``old`` as it was (same prompt, classes and label
        ids at each of its indices) and only adds items after them: raising ``items_per_class``,
        or adding templates or prompts that leave the earlier items where they were."""
        if self.classes != old.classes or self.total < old.total:
            return False
        return all(self.item(i) == old.item(i) for i in range(old.total))

    def to_json(self) -> dict:
        return {
            "classes": list(self.classes),
            "items_per_class": self.items_per_class,
            "templates": list(self.templates),
            "prompts": [[p, list(c)] for p, c in self.prompts],
        }


def spoken(name: str) -> str:
    return SPOKEN.get(name, name)


def parse_classes(spec: str) -> tuple[str, ...]:
    """``voc``, ``cityscapes``, ``shapes``, ``cat,dog,potted plant`` or ``@file`` (one per line)."""
    spec = spec.strip()
    if spec in PRESETS:
        return PRESETS[spec]
    if spec.startswith("@"):
        path = Path(spec[1:])
        if not path.exists():
            raise ValueError(f"class file {path} does not exist; write one class name per line")
        if not path.is_file():
            raise ValueError(
                f"{path} is not a regular file; give a file of class names, one a line"
            )
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read class file {path} as UTF-8 text: {err}") from err
    else:
        if spec.lower() in _NOT_PRESETS:  # dataset names a user may take for presets
            raise ValueError(
                f"unknown class preset {spec!r}; presets: {sorted(PRESETS)} (or list the classes)"
            )
        names = [s.strip() for s in spec.split(",")]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise ValueError(
            f"no classes in {spec!r}; give a preset ({', '.join(sorted(PRESETS))}), "
            "a comma-separated list or @file"
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"classes listed twice: {dupes}")
    return tuple(names)


def check_template(template: str) -> str:
    if "{class}" not in template:
        raise ValueError(f"template {template!r} has no {{class}}; e.g. {DEFAULT_TEMPLATE!r}")
    return template


def read_prompts(path: Path, classes: tuple[str, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A JSONL file of ``{"prompt": ..., "classes": [...]}`` (several classes per prompt)."""
    if not path.exists():
        raise ValueError(f"prompt file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file; give a JSONL file of prompts")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read prompt file {path} as UTF-8 text: {err}") from err
    example = '{"prompt": "a cat and a dog", "classes": ["cat", "dog"]}'
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or "prompt" not in row or "classes" not in row:
            raise ValueError(
                f"{path}:{n}: expected a JSON object with 'prompt' and 'classes', e.g. {example}"
            )
        prompt, names = row["prompt"], row["classes"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}:{n}: 'prompt' must be a non-empty string, got {prompt!r}")
        if not isinstance(names, list) or not names or not all(isinstance(c, str) for c in names):
            raise ValueError(
                f"{path}:{n}: 'classes' must be a non-empty list of class names, got {names!r}; "
                f"e.g. {example}"
            )
        names = tuple(names)
        unknown = [c for c in names if c not in classes]
        if unknown:
            raise ValueError(
                f"{path}:{n}: classes {unknown} are not in the class list {list(classes)}"
            )
        missing = [c for c in names if spoken(c) not in prompt]
        if missing:
            raise ValueError(
                f"{path}:{n}: the prompt {prompt!r} does not contain the class word(s) {missing}"
            )
        out.append((prompt, names))
    if not out:
        raise ValueError(f"prompt file {path} holds no prompts")
    if len({len(names) for _, names in out}) > 1:  # one batch, one (k, t) weight shape
        raise ValueError(
            f"{path}: every prompt must name the same number of classes; split the file"
        )
    return tuple(out)


def make_plan(
    classes: str, items_per_class: int, templates=(), prompt_file: Path | None = None
) -> Plan:
    names = parse_classes(classes)
    if items_per_class < 1:
        raise ValueError(f"images per class must be at least 1, got {items_per_class}")
    temps = tuple(check_template(t) for t in templates) or PRESET_TEMPLATES.get(
        classes.strip(), (DEFAULT_TEMPLATE,)
    )
    prompts = read_prompts(Path(prompt_file), names) if prompt_file else ()
    return Plan(names, items_per_class, temps, prompts)
