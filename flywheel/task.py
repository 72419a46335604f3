"""The task spec (`--task task.toml`): what the teacher is asked, written down once.

    description = "Classify product photos by fruit or vegetable."
    [classes]
    apple = "a round fruit with a stem dimple; red, green or yellow skin"
    pear = "a fruit that narrows toward the stem"
    [examples]                      # optional: sent to the teacher as few-shot images, before the photo
    apple = ["examples/apple1.jpg"]
    [settings]                      # optional: the acceptance settings the spec was written for (printed)
    target_label_precision = 0.95

The prompt is built from it (task_prompt); its digest (the description, every class with its definition in
order, and the example images' bytes) is part of every ledger key, so an edited spec never reuses another
question's answers, and an unchanged one never pays twice. The label step records the spec in the run
(task.json), and later steps on the run use it without --task, so the cascade, the flywheel and the server
ask the same question.
"""
import hashlib
import json
import tomllib
from pathlib import Path
from typing import NamedTuple

from flywheel import FlywheelError

KEYS = {"description", "classes", "examples", "settings"}


class TaskError(FlywheelError):
    """A task spec the run cannot use; the message names the file, the problem and the fix."""


class Task(NamedTuple):
    description: str
    classes: dict         # class name -> one-line definition, in the file's order
    examples: dict        # class name -> [image path], resolved against the spec's folder
    settings: dict
    path: str
    digest: str

    def __hash__(self):  # the digest stands for the whole spec (the question hash caches on it)
        return hash(self.digest)

    def record(self) -> dict:
        """What task.json holds: enough to rebuild the Task without the TOML file."""
        return {"path": self.path, "digest": self.digest, "description": self.description, "classes": self.classes,
                "examples": self.examples, "settings": self.settings}


def digest_of(description, classes, example_bytes) -> str:
    """A short hash of what the teacher is shown: description, classes with definitions in order, example images.

    >>> digest_of("d", {"a": "x", "b": "y"}, []) == digest_of("d", {"b": "y", "a": "x"}, [])
    False
    """
    h = hashlib.sha256(json.dumps({"description": description, "classes": list(classes.items())}).encode())
    for b in example_bytes:
        h.update(hashlib.sha256(b).digest())
    return h.hexdigest()[:16]


def build_task(spec: dict, path, base=None) -> Task:
    """A parsed spec (the TOML's tables) -> Task, checked; example paths resolve against base (the spec's folder)."""
    where = f"task spec {path}"
    extra = set(spec) - KEYS
    if extra:
        raise TaskError(f"{where}: unknown key(s) {sorted(extra)}; a spec has {sorted(KEYS)}")
    desc = spec.get("description")
    if not isinstance(desc, str) or not desc.strip():
        raise TaskError(f'{where}: needs description = "what is classified and why" (a non-empty string)')
    classes = spec.get("classes")
    if not isinstance(classes, dict) or len(classes) < 2:
        raise TaskError(f'{where}: needs a [classes] table with at least two entries, name = "one-line definition"')
    bad = [k for k, v in classes.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise TaskError(f'{where}: class(es) {bad} need a one-line definition (name = "definition")')
    base = Path(base) if base is not None else Path(path).parent
    examples, blobs = {}, []
    for c, files in (spec.get("examples") or {}).items():
        if c not in classes:
            raise TaskError(f"{where}: [examples] names {c!r}, which is not in [classes] {list(classes)}")
        files = [files] if isinstance(files, str) else list(files)
        examples[c] = []
        for f in files:
            p = Path(f) if Path(f).is_absolute() else base / f
            if not p.is_file():
                raise TaskError(f"{where}: example image {f!r} for {c!r} does not exist (looked at {p})")
            examples[c].append(str(p))
            blobs.append(p.read_bytes())
    return Task(desc.strip(), dict(classes), examples, dict(spec.get("settings") or {}), str(path),
                digest_of(desc.strip(), classes, blobs))


def load_task(path) -> Task:
    """--task FILE -> Task, or a TaskError naming the problem (unreadable, not TOML, a missing table)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            spec = tomllib.load(f)
    except FileNotFoundError:
        raise TaskError(f"task spec {p} does not exist; write one (see README, 'The task spec') or drop --task") from None
    except tomllib.TOMLDecodeError as e:
        raise TaskError(f"task spec {p} is not valid TOML: {e}") from None
    return build_task(spec, p)


def recorded_task(path):
    """The Task a run's label step recorded (task.json), or None; its example images must be unchanged."""
    p = Path(path)
    if not p.exists():
        return None
    rec = json.loads(p.read_text())
    spec = {"description": rec["description"], "classes": rec["classes"], "examples": rec["examples"],
            "settings": rec["settings"]}
    task = build_task(spec, rec["path"], base="/")
    if task.digest != rec["digest"]:
        raise TaskError(f"{p}: the task's example images changed since the label step recorded it (digest "
                        f"{task.digest}, recorded {rec['digest']}); rerun --step label --task with the spec")
    return task


def check_classes(task: Task, classes):
    """The spec must name exactly the run's classes."""
    if set(task.classes) != set(classes):
        missing, extra = sorted(set(classes) - set(task.classes)), sorted(set(task.classes) - set(classes))
        raise TaskError(f"task spec {task.path} does not match the run's classes {list(classes)}: "
                        f"missing {missing}, not in the run {extra}; define every class of the run once")


def task_prompt(task: Task, class_order) -> str:
    """The user text for one photo: the description, then the classes in class_order with their definitions.

    >>> t = build_task({"description": "Fruit.", "classes": {"apple": "round", "pear": "narrow"}}, "t.toml")
    >>> print(task_prompt(t, ["pear", "apple"]).split("Reply")[0].strip())
    Fruit.
    <BLANKLINE>
    Classify the photo into exactly one of these classes:
    - pear: narrow
    - apple: round
    """
    lines = "\n".join(f"- {c}: {task.classes[c]}" for c in class_order)
    return (f"{task.description}\n\nClassify the photo into exactly one of these classes:\n{lines}\n\n"
            'Reply with strict JSON and nothing else:\n{"label": "<one class name exactly as listed>", '
            '"confidence": <number 0-1>, "why": "<at most 12 words>"}')


def example_parts(task: Task) -> list:
    """The few-shot images as chat content parts, each after a line naming its class (JPEG data URLs)."""
    import base64
    from PIL import Image
    from flywheel.data import jpeg_bytes
    parts = []
    for c, files in task.examples.items():
        for f in files:
            with Image.open(f) as im:
                b64 = base64.b64encode(jpeg_bytes(im.convert("RGB"))).decode()
            parts += [{"type": "text", "text": f"Example of {c}:"},
                      {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64}}]
    if parts:
        parts.append({"type": "text", "text": "Now the photo to classify:"})
    return parts
