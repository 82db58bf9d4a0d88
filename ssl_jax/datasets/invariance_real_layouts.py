"""The folders of the real benchmarks of Purushwalkam & Gupta 2020 (ALOI, GOT-10k,
PASCAL3D+), read into the plan of a transformation-set dataset: which file, which
box, which set, which class. Only file names and annotations are read here;
invariance_real.py decodes, crops and writes the images, and documents the layouts
and the choices made (module doc there).
"""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from ssl_jax.datasets.invariance_sets import MIN_SET_SIZE
from ssl_jax.errors import UserError

CONTEXT = 0.1  # crops: the box grown by 10% of its width and height on each side

ALOI_SPLITS = ("viewpoint", "illumination_direction", "illumination_colour")
ALOI_COLOURS = (110, 250)  # ALOI's illumination colour settings, i110 .. i250
ALOI_LAYOUT = ("DIR/aloi_red4_view/png4/<object>/<object>_r<angle>.png (viewpoint), "
               "DIR/aloi_red4_ill/png4/<object>/<object>_l<light>c<camera>.png (illumination "
               "direction), DIR/aloi_red4_col/png4/<object>/<object>_i<T>.png (illumination "
               "colour); png/ or png2/ for the other resolutions, any folder names above "
               "<object>/")
_ALOI_FILE = re.compile(r"(\d+)_(?:r(\d+)|l(\d+)c(\d+)|i(\d+))\.png", re.IGNORECASE)

GOT_LEVELS = 8  # cover.label: the visible fraction of the object in eighths, 8 = all
GOT_LAYOUT = ("DIR/train/GOT-10k_Train_000001/{00000001.jpg, ..., groundtruth.txt, "
              "cover.label, absence.label, meta_info.ini} and/or DIR/val/GOT-10k_Val_000001/"
              "..., or the track folders directly in DIR")

PASCAL_BINS = 8  # azimuth bins of 45 degrees, centred on 0, 45, ..., 315
PASCAL_LAYOUT = ("DIR/Images/<class>_pascal/<image>.jpg and DIR/Annotations/<class>_pascal/"
                 "<image>.mat, as PASCAL3D+_release1.1.zip unpacks (DIR = PASCAL3D+_release1.1)")


@dataclasses.dataclass(frozen=True)
class Frame:
    """One image of a set: file_name relative to the folder read, '/'-separated;
    box (left, top, right, bottom) in 0-based pixels, right and bottom excluded, the
    crop (it may pass the image's edges: it is clipped), or None for the whole image."""
    file_name: str
    strength: float
    box: tuple[float, float, float, float] | None = None


@dataclasses.dataclass(frozen=True)
class ImageSet:
    what: str  # e.g. "object 12", "track train/GOT-10k_Train_000001"
    label: int
    frames: tuple[Frame, ...]


@dataclasses.dataclass
class Plan:
    class_names: list[str]
    splits: dict[str, list[ImageSet]]  # sets in set_id order, frames in frame order
    skipped: list[str] = dataclasses.field(default_factory=list)  # "split: what (why)"
    notes: list[str] = dataclasses.field(default_factory=list)  # printed after preparing


def evenly(n: int, k: int | None, cyclic: bool = False) -> list[int]:
    """k of range(n) evenly spread (all of them when k is None or >= n): cyclic, k steps
    of a full turn from the first (i * n // k); else from the first to the last."""
    if k is None or k >= n:
        return list(range(n))
    if cyclic:
        return [i * n // k for i in range(k)]
    return [(2 * i * (n - 1) + k - 1) // (2 * (k - 1)) for i in range(k)]  # rounded


def with_context(left: float, top: float, width: float, height: float) -> tuple[float, ...]:
    """A box (left, top, width, height) -> the crop (left, top, right, bottom), CONTEXT
    of its width and height added on each side."""
    dx, dy = CONTEXT * width, CONTEXT * height
    return (left - dx, top - dy, left + width + dx, top + height + dy)


def check_folder(root: str | None, dataset: str, layout: str) -> str:
    if not root:
        raise UserError(f"--dataset {dataset} needs --manual_dir DIR, the folder of the "
                        f"downloaded benchmark: {layout}.")
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise UserError(f"--manual_dir {root} is not a folder. {dataset} reads {layout}.")
    return root


def _rel(root: str, path: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _no_sets(split: str, root: str, what: str) -> UserError:
    return UserError(f"{split}: no set of at least {MIN_SET_SIZE} images in {root} ({what}). "
                     "The invariance metric needs sets of >= 3 images: check the folder, or "
                     "ask for more images a set (--frames_per_set).")


# ------------------------------------------------------------------ ALOI

def _aloi_strength(split: str, value: int) -> float:
    if split == "viewpoint":
        return value / 360.0  # the turn, as a fraction of a full one
    if split == "illumination_colour":
        return (value - ALOI_COLOURS[0]) / (ALOI_COLOURS[1] - ALOI_COLOURS[0])
    return 0.0  # a light's number is no magnitude


def aloi(root: str, objects: int | None = None, frames_per_set: int | None = None) -> Plan:
    """ALOI's object folders anywhere under root -> the three splits' sets."""
    found: dict[str, dict[tuple, str]] = {s: {} for s in ALOI_SPLITS}  # (obj, key) -> file
    for parent, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            m = _ALOI_FILE.fullmatch(name)
            if not m:
                continue
            if m[2] is not None:
                split, key = "viewpoint", (int(m[2]),)
            elif m[3] is not None:
                split, key = "illumination_direction", (int(m[4]), int(m[3]))  # camera, light
            else:
                split, key = "illumination_colour", (int(m[5]),)
            rel = _rel(root, os.path.join(parent, name))
            first = found[split].setdefault((int(m[1]), key), rel)
            if first != rel:
                raise UserError(f"{first} and {rel} in {root} are the same ALOI image (two "
                                "copies or resolutions unpacked there): keep one of them (e.g. "
                                "only png4/, the quarter resolution), or pass the folder of one "
                                "as --manual_dir.")
    ids = sorted({obj for files in found.values() for obj, _ in files})
    if not ids:
        raise UserError(f"{root} holds no ALOI images. aloi_invariance reads the downloads of "
                        f"https://aloi.science.uva.nl/ (aloi_red4_view.tar, aloi_red4_ill.tar, "
                        f"aloi_red4_col.tar, or the full-size aloi_view.tar, ...) unpacked under "
                        f"--manual_dir: {ALOI_LAYOUT}.")
    ids = ids[:objects]
    label = {obj: i for i, obj in enumerate(ids)}
    plan = Plan([str(i) for i in ids], {})
    for split in ALOI_SPLITS:
        groups: dict[tuple, list[tuple[int, str]]] = {}  # set -> [(order, file)]
        for (obj, key), rel in found[split].items():
            if obj in label:
                group = (obj, key[0]) if split == "illumination_direction" else (obj,)
                groups.setdefault(group, []).append((key[-1], rel))
        sets = []
        for group in sorted(groups):
            frames = sorted(groups[group])
            what = f"object {group[0]}" + (f" camera c{group[1]}" if len(group) > 1 else "")
            if len(frames) < MIN_SET_SIZE:
                plan.skipped.append(f"{split}: {what} ({len(frames)} image(s))")
                continue
            chosen = [frames[i] for i in evenly(len(frames), frames_per_set,
                                                cyclic=split == "viewpoint")]
            sets.append(ImageSet(what, label[group[0]], tuple(
                Frame(rel, _aloi_strength(split, v)) for v, rel in chosen)))
        if groups and not sets:
            raise _no_sets(split, root, f"{sum(map(len, groups.values()))} images of "
                           f"{len(groups)} object(s), fewer than {MIN_SET_SIZE} each")
        if sets:
            plan.splits[split] = sets
    plan.notes.append(f"{len(ids)} ALOI object(s): {ids[0]} .. {ids[-1]}.")
    return plan


# ------------------------------------------------------------------ GOT-10k

def _got_tracks(root: str) -> list[str]:
    """The track folders (holding groundtruth.txt), relative to root, sorted."""
    parents = [p for p in ("train", "val") if os.path.isdir(os.path.join(root, p))] or ["."]
    tracks = []
    for parent in parents:
        folder = os.path.join(root, parent)
        tracks += [_rel(root, os.path.join(folder, d)) for d in sorted(os.listdir(folder))
                   if os.path.isfile(os.path.join(folder, d, "groundtruth.txt"))]
    if not tracks:
        raise UserError(f"{root} holds no GOT-10k tracks (folders with a groundtruth.txt). "
                        f"got10k_occlusion reads the train and/or val sets of "
                        f"http://got-10k.aitestbed.com/ unpacked as {GOT_LAYOUT}.")
    return tracks


def _lines(path: str) -> list[str] | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.strip() for line in f.read().strip().splitlines()]


def _got_track(root: str, track: str):
    """-> (object class, {cover: [usable frame indices]}, boxes (n, 4)) or a str, why
    the track cannot be used."""
    d = os.path.join(root, track)
    path = os.path.join(d, "groundtruth.txt")
    try:
        boxes = np.array([[float(v) for v in re.split(r"[,\s]+", line)]
                          for line in _lines(path)], np.float64).reshape(-1, 4)
        cover = _lines(os.path.join(d, "cover.label"))
        absence = _lines(os.path.join(d, "absence.label"))
        cover = None if cover is None else np.array(cover, np.int64)
        absence = np.zeros(len(boxes), np.int64) if absence is None else np.array(absence,
                                                                                 np.int64)
    except ValueError as e:
        raise UserError(f"The annotations of {d} are not GOT-10k's (groundtruth.txt: x,y,w,h "
                        f"a line; cover.label, absence.label: an integer a line): {e}. Download "
                        "the track again.") from None
    if cover is None:
        return "no cover.label (GOT-10k's test tracks have none)"
    if not len(boxes) == len(cover) == len(absence):
        return (f"groundtruth.txt, cover.label and absence.label have {len(boxes)}, "
                f"{len(cover)} and {len(absence)} lines")
    meta = dict(line.split(":", 1) for line in _lines(os.path.join(d, "meta_info.ini")) or []
                if ":" in line)
    meta = {k.strip(): v.strip() for k, v in meta.items()}
    if not meta.get("object_class"):
        return "no object_class in meta_info.ini"
    usable = ((absence == 0) & (cover >= 0) & (cover <= GOT_LEVELS)
              & (boxes[:, 2] > 0) & (boxes[:, 3] > 0))
    levels: dict[int, list[int]] = {}
    for i in np.flatnonzero(usable):
        levels.setdefault(int(cover[i]), []).append(int(i))
    return meta["object_class"], levels, boxes


def got10k(root: str, frames_per_set: int = 8, max_tracks: int | None = None) -> Plan:
    """GOT-10k's annotated tracks -> the `occlusion` split: a track's set holds one frame
    of each cover level (the middle one in time), most visible first."""
    usable, skipped = [], []
    for track in _got_tracks(root):
        read = _got_track(root, track)
        if isinstance(read, str):
            skipped.append(f"occlusion: track {track} ({read})")
        elif len(read[1]) < MIN_SET_SIZE:
            skipped.append(f"occlusion: track {track} ({len(read[1])} cover level(s) among "
                           f"{sum(map(len, read[1].values()))} usable frames)")
        else:
            usable.append((track, read))
    if not usable:
        raise _no_sets("occlusion", root, f"{len(skipped)} track(s), none with frames of "
                       f"{MIN_SET_SIZE} cover levels; the first: {skipped[0]}")
    chosen = [usable[i] for i in evenly(len(usable), max_tracks, cyclic=True)]
    class_names = sorted({cls for _, (cls, _, _) in chosen})
    sets = []
    for track, (cls, levels, boxes) in chosen:
        covers = sorted(levels, reverse=True)  # most visible first
        frames = []
        for c in (covers[i] for i in evenly(len(covers), frames_per_set)):
            i = levels[c][len(levels[c]) // 2]
            frames.append(Frame(f"{track}/{i + 1:08d}.jpg", 1.0 - c / GOT_LEVELS,
                                with_context(*boxes[i])))
        sets.append(ImageSet(f"track {track}", class_names.index(cls), tuple(frames)))
    notes = [f"{len(usable)} of {len(usable) + len(skipped)} GOT-10k tracks have frames of "
             f"{MIN_SET_SIZE} or more cover levels; "
             f"{f'{len(sets)} taken (--max_tracks)' if max_tracks else 'all taken'}, "
             f"{len(class_names)} object classes."]
    return Plan(class_names, {"occlusion": sets}, skipped, notes)


# ------------------------------------------------------------------ PASCAL3D+

def _number(value) -> float | None:
    """A MATLAB scalar as loadmat gives it (squeezed) -> float; None if empty."""
    a = np.asarray(value, dtype=np.float64).ravel() if value is not None else np.zeros(0)
    return float(a[0]) if a.size else None


def _azimuth(viewpoint) -> float | None:
    """The continuous azimuth, or the coarse one where PASCAL3D+ has none (distance 0)."""
    azimuth = _number(getattr(viewpoint, "azimuth", None))
    if azimuth is not None and _number(getattr(viewpoint, "distance", None)) != 0:
        return azimuth
    return _number(getattr(viewpoint, "azimuth_coarse", None))


def _pascal_objects(path: str) -> tuple[str | None, list]:
    """A PASCAL3D+ annotation -> (its image's file name, its objects as mat_structs)."""
    from scipy import io as sio  # scipy comes with jax; imported only when needed
    try:
        record = sio.loadmat(path, squeeze_me=True, struct_as_record=False)["record"]
        objects = record.objects
    except Exception as e:  # noqa: BLE001 -- scipy raises many types for damaged files
        raise UserError(f"{path} is not a readable PASCAL3D+ annotation (a MATLAB file with "
                        f"`record.objects`; {type(e).__name__}: {e}). Unpack "
                        "PASCAL3D+_release1.1.zip again.") from None
    name = getattr(record, "filename", None)
    # squeeze_me: a 1x1 struct array is one struct, a 1xN one an array of structs.
    objects = list(np.ravel(objects)) if isinstance(objects, np.ndarray) else [objects]
    return (name if isinstance(name, str) and name else None), objects


def pascal3d(root: str, frames_per_set: int | None = None) -> Plan:
    """PASCAL3D+'s PASCAL VOC part -> the `instance` split: a set is the objects of one
    class seen from one azimuth bin, different instances, in file order."""
    folders = {d: os.path.join(root, d) for d in ("Images", "Annotations")}
    missing = [d for d, p in folders.items() if not os.path.isdir(p)]
    classes = [] if missing else sorted(
        d[:-len("_pascal")] for d in os.listdir(folders["Annotations"])
        if d.endswith("_pascal") and os.path.isdir(os.path.join(folders["Annotations"], d)))
    if not classes:
        raise UserError(f"{root} has no {' or '.join(missing) or 'Annotations/<class>_pascal'}"
                        f" folder. pascal3d_instance reads PASCAL3D+ release 1.1 "
                        f"(https://cvgl.stanford.edu/projects/pascal3d.html) unpacked as "
                        f"{PASCAL_LAYOUT}.")
    groups: dict[tuple[int, int], list[Frame]] = {}
    total = kept = 0
    for c, cls in enumerate(classes):
        folder = f"{cls}_pascal"
        annotations = os.path.join(folders["Annotations"], folder)
        for name in sorted(n for n in os.listdir(annotations) if n.endswith(".mat")):
            image, objects = _pascal_objects(os.path.join(annotations, name))
            for obj in objects:
                if getattr(obj, "class", None) != cls:
                    continue  # another class's object in the image (it has its own folder)
                total += 1
                viewpoint = getattr(obj, "viewpoint", None)
                azimuth = None if isinstance(viewpoint, np.ndarray) else _azimuth(viewpoint)
                box = np.asarray(getattr(obj, "bbox", []), np.float64).ravel()
                if (azimuth is None or len(box) != 4 or box[2] < box[0] or box[3] < box[1]
                        or any(_number(getattr(obj, flag, 0)) for flag in
                               ("truncated", "occluded", "difficult"))):
                    continue
                kept += 1
                x1, y1, x2, y2 = box  # 1-based, inclusive (MATLAB's)
                azimuth_bin = int((azimuth + 180 / PASCAL_BINS) % 360 // (360 / PASCAL_BINS))
                groups.setdefault((c, azimuth_bin % PASCAL_BINS), []).append(Frame(
                    f"Images/{folder}/{image or name[:-4] + '.jpg'}", 0.0,
                    with_context(x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1)))
    sets, skipped = [], []
    for (c, b), frames in sorted(groups.items()):
        what = f"{classes[c]} azimuth {b * 360 // PASCAL_BINS}"
        if len(frames) < MIN_SET_SIZE:
            skipped.append(f"instance: {what} ({len(frames)} object(s))")
            continue
        sets.append(ImageSet(what, c, tuple(frames[i] for i in evenly(len(frames),
                                                                       frames_per_set))))
    if not sets:
        raise _no_sets("instance", root, f"{kept} usable objects of {total}")
    notes = [f"{kept} of {total} PASCAL3D+ objects of the {len(classes)} classes are "
             "usable (not truncated, occluded or difficult, with a viewpoint)."]
    return Plan(classes, {"instance": sets}, skipped, notes)
