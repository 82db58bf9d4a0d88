"""Tiny copies of the real benchmarks' layouts (ALOI, GOT-10k, PASCAL3D+), written at
test time, for tests/test_invariance_real.py. Every image is a solid colour (a box of
another colour where the layout has boxes) that names what it shows, so a record's
pixels say which file and which box it came from."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

BACKGROUND = (40, 40, 40)


def _save(path, size: tuple[int, int], colour, box=None, box_colour=None) -> None:
    """An image (w, h) of `colour`, with pixels [left, right) x [top, bottom) of
    `box` in box_colour; .png or .jpg by the name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    w, h = size
    pixels = np.empty((h, w, 3), np.uint8)
    pixels[:] = colour
    if box is not None:
        left, top, right, bottom = box
        pixels[max(0, top):bottom, max(0, left):right] = box_colour
    if str(path).endswith(".jpg"):  # 4:4:4: no colour bleeding past the box's edges
        Image.fromarray(pixels).save(path, quality=98, subsampling=0)
    else:
        Image.fromarray(pixels).save(path)


# ------------------------------------------------------------------ ALOI

ALOI_OBJECTS = (1, 2, 3, 12)
ALOI_ANGLES = tuple(range(0, 360, 45))  # ALOI: 0..355 in steps of 5
ALOI_LIGHTS, ALOI_CAMERAS = (1, 2, 3, 4), (1, 2)  # ALOI: l1..l8, c1..c3
ALOI_COLOURS = (110, 120, 130, 150, 250)  # ALOI: i110..i250
ALOI_SIZES = {1: (24, 18), 2: (30, 20), 3: (20, 26), 12: (28, 21)}  # ALOI: 192x144 (red4)


def aloi_colour(obj: int, split: str, value: int, camera: int = 0) -> tuple[int, int, int]:
    """The colour of one ALOI image: red the object, green the split and camera, blue the
    setting."""
    return (20 * ALOI_OBJECTS.index(obj) + 30,
            {"viewpoint": 40, "illumination_direction": 120, "illumination_colour": 200}[split]
            + 20 * camera, (value * 97) % 200 + 30)


def aloi_file(obj: int, split: str, value: int, camera: int = 0) -> str:
    """Where make_aloi puts an image, relative to DIR: each transformation in another of
    the layouts people have (the tar's own folders; all tars unpacked in one place; the
    authors' renamed folders)."""
    if split == "viewpoint":
        return f"aloi_red4_view/png4/{obj}/{obj}_r{value}.png"
    if split == "illumination_direction":
        return f"ALOI_illumdir/{obj}/{obj}_l{value}c{camera}.png"
    return f"png4/{obj}/{obj}_i{value}.png"


def make_aloi(root) -> None:
    """Objects 1, 2, 3, 12: all their images, but object 12 has two views only (its
    viewpoint set is skipped) and object 3 no illumination direction images; a stereo
    image and a text file that are not read."""
    for obj in ALOI_OBJECTS:
        size = ALOI_SIZES[obj]
        for angle in (ALOI_ANGLES[:2] if obj == 12 else ALOI_ANGLES):
            _save(os.path.join(root, aloi_file(obj, "viewpoint", angle)), size,
                  aloi_colour(obj, "viewpoint", angle))
        for light in ALOI_LIGHTS:
            for camera in ALOI_CAMERAS if obj != 3 else ():
                _save(os.path.join(root, aloi_file(obj, "illumination_direction", light,
                                                   camera)), size,
                      aloi_colour(obj, "illumination_direction", light, camera))
        for t in ALOI_COLOURS:
            _save(os.path.join(root, aloi_file(obj, "illumination_colour", t)), size,
                  aloi_colour(obj, "illumination_colour", t))
    _save(os.path.join(root, "aloi_red4_stereo/png4/1/1_c.png"), (8, 8), (0, 0, 0))
    with open(os.path.join(root, "README.txt"), "w") as f:
        f.write("not an image")


# ------------------------------------------------------------------ GOT-10k

# track -> (class, image size, covers, absences or None (no absence.label)). Box of frame
# i: GOT_BOX(i), x, y, w, h. Frame 4 of train 3 has a box past the image's right edge.
GOT_TRACKS = {
    "train/GOT-10k_Train_000001": ("zebra", (80, 60), [8, 8, 8, 7, 6, 6, 5, 3, 0, 8],
                                   [0, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
    "train/GOT-10k_Train_000002": ("sea turtle", (64, 48), [8, 8, 8, 8, 8, 8],
                                   [0, 0, 0, 0, 0, 0]),  # one level: skipped
    "train/GOT-10k_Train_000003": ("sea turtle", (72, 64), [8, 6, 4, 2, 1, 0],
                                   [0, 0, 0, 0, 0, 0]),
    "train/GOT-10k_Train_000004": ("zebra", (64, 48), [8, 4, 2], None),  # no cover.label
    "val/GOT-10k_Val_000001": ("car", (96, 64), [8, 4, 4, 0], None),
}
GOT_NO_COVER = "train/GOT-10k_Train_000004"


def got_box(track: str, i: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the object in frame i (0-based) of a track."""
    if track == "train/GOT-10k_Train_000003" and i == 4:
        return (50, 20, 30, 20)  # 8 pixels past the right edge (72)
    return (10 + 2 * i, 12, 30, 20)


def got_colour(track: str, i: int) -> tuple[int, int, int]:
    return (200, 30 + 20 * i, 40 + 50 * list(GOT_TRACKS).index(track))


def make_got10k(root) -> None:
    for track, (cls, size, covers, absences) in GOT_TRACKS.items():
        d = os.path.join(root, track)
        for i in range(len(covers)):
            x, y, w, h = got_box(track, i)
            _save(os.path.join(d, f"{i + 1:08d}.jpg"), size, BACKGROUND, (x, y, x + w, y + h),
                  got_colour(track, i))
        with open(os.path.join(d, "groundtruth.txt"), "w") as f:
            f.write("".join("{:.4f},{:.4f},{:.4f},{:.4f}\n".format(*got_box(track, i))
                            for i in range(len(covers))))
        if track != GOT_NO_COVER:
            with open(os.path.join(d, "cover.label"), "w") as f:
                f.write("".join(f"{c}\n" for c in covers))
        if absences is not None:
            with open(os.path.join(d, "absence.label"), "w") as f:
                f.write("".join(f"{a}\n" for a in absences))
        with open(os.path.join(d, "meta_info.ini"), "w") as f:
            f.write(f"[METAINFO]\nurl: https://youtu.be/x\nbegin: 00:00:01\nend: 00:00:05\n"
                    f"anno_fps: 10Hz\nobject_class: {cls}\nmotion_class: running\n"
                    f"major_class: animal\nroot_class: animal\nresolution: {size}\n")


# ------------------------------------------------------------------ PASCAL3D+

# (class folder, image, size, [objects]); an object: (class, bbox x1 y1 x2 y2 (1-based,
# inclusive), azimuth, flags {truncated, occluded, difficult}; azimuth None: no
# viewpoint ([]); ("coarse", a) a viewpoint whose continuous azimuth is missing
# (distance 0) and azimuth_coarse = a).
PASCAL_IMAGES = [
    ("car", "2008_000001", (60, 40), [("car", (5, 5, 30, 25), 10, {}),
                                      ("car", (35, 10, 55, 35), 350, {}),  # two in one
                                      ("person", (1, 1, 6, 6), 0, {})]),
    ("car", "2008_000002", (50, 50), [("car", (10, 10, 40, 30), 20, {})]),  # only one
    ("car", "2008_000003", (64, 48), [("car", (40, 2, 60, 12), 5, {"truncated": 1}),
                                      ("car", (20, 20, 50, 40), 100, {})]),
    ("car", "2008_000004", (48, 64), [("car", (8, 8, 38, 48), 80, {}),
                                      ("car", (2, 2, 12, 12), 95, {"occluded": 1})]),
    ("car", "2008_000005", (70, 50), [("car", (10, 6, 60, 44), ("coarse", 90), {}),
                                      ("car", (1, 46, 8, 50), None, {}),
                                      ("car", (62, 2, 69, 10), 180, {"difficult": 1})]),
    ("car", "2008_000006", (40, 40), [("car", (5, 5, 35, 35), 185, {})]),  # bin alone
    ("chair", "2008_000007", (56, 42), [("chair", (5, 5, 30, 36), 40, {})]),
    ("chair", "2008_000008", (42, 56), [("chair", (6, 10, 36, 50), 50, {}),
                                        ("chair", (1, 1, 8, 8), 45, {"truncated": 1})]),
    ("chair", "2008_000009", (50, 50), [("chair", (10, 10, 40, 40), 45, {})]),
]
PASCAL_CLASSES = ["car", "chair"]
# The sets: (class, azimuth bin start in degrees) -> [(image, object index)], in order.
PASCAL_SETS = {
    ("car", 0): [("2008_000001", 0), ("2008_000001", 1), ("2008_000002", 0)],
    ("car", 90): [("2008_000003", 1), ("2008_000004", 0), ("2008_000005", 0)],
    ("chair", 45): [("2008_000007", 0), ("2008_000008", 0), ("2008_000009", 0)],
}


def pascal_colour(image: str, k: int) -> tuple[int, int, int]:
    n = int(image[-2:])
    return (30 + 22 * n, 220 - 50 * k, 60 + 40 * k)


def _viewpoint(azimuth):
    if azimuth is None:
        return np.zeros((0, 0))
    if isinstance(azimuth, tuple):  # no continuous viewpoint: distance 0
        return {"azimuth": 0.0, "azimuth_coarse": float(azimuth[1]), "elevation": 0.0,
                "elevation_coarse": 10.0, "distance": 0.0, "theta": 0.0}
    return {"azimuth": float(azimuth), "azimuth_coarse": float(round(azimuth / 15) * 15),
            "elevation": 5.0, "elevation_coarse": 0.0, "distance": 4.5, "theta": 0.0}


def write_annotation(path, file_name: str, objects) -> None:
    """A PASCAL3D+ annotation: `record` (a struct) whose `objects` is a 1xN struct array,
    as MATLAB writes it (scipy.io.savemat of a structured array)."""
    from scipy import io as sio
    fields = ["class", "bbox", "viewpoint", "truncated", "occluded", "difficult"]
    structs = np.zeros((1, len(objects)), dtype=[(f, object) for f in fields])
    for k, (cls, bbox, azimuth, flags) in enumerate(objects):
        structs[0, k] = (cls, np.array([bbox], np.float64), _viewpoint(azimuth),
                         flags.get("truncated", 0), flags.get("occluded", 0),
                         flags.get("difficult", 0))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sio.savemat(path, {"record": {"filename": file_name, "folder": "VOC2012",
                                  "imgsize": np.array([[1, 1, 3]]), "objects": structs}})


def make_pascal3d(root) -> None:
    for folder, image, size, objects in PASCAL_IMAGES:
        path = os.path.join(root, "Images", f"{folder}_pascal", f"{image}.jpg")
        for k, (_, (x1, y1, x2, y2), _, _) in enumerate(objects):
            if k == 0:
                _save(path, size, BACKGROUND, (x1 - 1, y1 - 1, x2, y2), pascal_colour(image, k))
            else:  # the next boxes drawn over the image
                pixels = np.asarray(Image.open(path)).copy()
                pixels[y1 - 1:y2, x1 - 1:x2] = pascal_colour(image, k)
                Image.fromarray(pixels).save(path, quality=98, subsampling=0)
        write_annotation(os.path.join(root, "Annotations", f"{folder}_pascal", f"{image}.mat"),
                         f"{image}.jpg", objects)
