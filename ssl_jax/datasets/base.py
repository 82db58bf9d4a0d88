"""What every offline builder shares: image checks and the streaming array_record writer.

    class MyData(base.StreamingBuilder, skip_registration=True): ...   # a builder
    data, converted = base.fix_image(jpeg_bytes, quality=95)           # decode once, fix
    yield from base.check_images(items, quality=..., skip=..., bad=..., fix=...)

StreamingBuilder writes each split's examples to array_record shards of at most
SHARD_BYTES as they come, in order, in TFDS's `incomplete.*` folder (renamed
into place only when every split is written): TFDS's own writer needs
TensorFlow past 1 GB a split (imagenet.py's docstring says why). Every builder
in ssl_jax/datasets/ derives from it; the input pipeline (ssl_jax/data/) never
imports a builder.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
from collections.abc import Iterable, Iterator
from concurrent import futures

import tensorflow_datasets as tfds
from absl import logging
from array_record.python import array_record_module
from PIL import Image
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.core import splits as splits_lib
from tensorflow_datasets.core import utils as tfds_utils

from ssl_jax.errors import UserError

SHARD_BYTES = 1 << 30  # a shard's most serialized bytes: TFDS's DEFAULT_MAX_SHARD_SIZE
_JPEG_MAGIC = b"\xff\xd8\xff"


def features(class_names: list[str]) -> tfds.features.FeaturesDict:
    """TFDS imagenet2012's features, with these class names."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=list(class_names)),
        "file_name": tfds.features.Text(),
    })


# ------------------------------------------------------------ images

class BadImageError(ValueError):
    """Image bytes that are empty or do not decode."""


def fix_image(data: bytes, quality: int) -> tuple[bytes, str | None]:
    """Decodes image bytes once as a check -> (JPEG bytes to store, what was converted).

    An RGB or greyscale JPEG is kept byte for byte; anything else (CMYK JPEG,
    PNG, ...) is converted to RGB and re-encoded as JPEG at `quality`.
    Raises BadImageError for an empty, truncated or undecodable image.
    """
    if not data:
        raise BadImageError("is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            keep = data[:3] == _JPEG_MAGIC and im.mode in ("RGB", "L")
            if keep:
                # Decode at 1/8 scale: every coefficient is still entropy-decoded,
                # so a truncated stream fails the same, in ~half the time.
                im.draft(im.mode, (1, 1))
            im.load()  # ImageFile.LOAD_TRUNCATED_IMAGES is False: truncation raises
            if keep:
                return data, None
            converted = f"{im.format} {im.mode} -> RGB JPEG"
            rgb = im.convert("RGB")
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for corrupt data
        raise BadImageError(f"cannot be decoded ({type(e).__name__}: {e})") from e
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue(), converted


def check_images(items: Iterable[tuple], *, quality: int, skip: bool, bad: list[str],
                 fix: str, workers: int | None = None) -> Iterator[tuple]:
    """Checks and fixes images on threads, in order, a bounded window at a time.

    items: (member, example dict whose "image" is the bytes read). Yields the
    examples with their image fixed. A bad image raises UserError naming the
    member and `fix`, or with skip is left out, logged and appended to `bad`.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    with futures.ThreadPoolExecutor(workers) as pool:
        window = collections.deque()

        def done():
            (member, example), future = window.popleft()
            try:
                data, converted = future.result()
            except BadImageError as e:
                if not skip:
                    raise UserError(f"{member} {e}. {fix}, or pass --skip_bad_images to "
                                    "leave such images out (each is logged and counted).") from e
                logging.warning("Leaving out %s: it %s.", member, e)
                bad.append(f"{member} ({e})")
                return None
            if converted:
                logging.info("%s: %s.", member, converted)
            return dict(example, image=data)

        for item in items:
            window.append((item, pool.submit(fix_image, item[1]["image"], quality)))
            if len(window) >= 4 * workers:
                if (out := done()) is not None:
                    yield out
        while window:
            if (out := done()) is not None:
                yield out


@dataclasses.dataclass(frozen=True)
class SortedSerializer:
    """TFDS's example serializer, writing the tf.Example's feature map in key order:
    protobuf writes a map in its hash table's order, which changes from one process to
    the next, and the same arguments must give the same bytes."""
    serializer: object

    def serialize_example(self, example) -> bytes:
        return self.serializer.get_tf_example(example).SerializeToString(deterministic=True)


class StreamingBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder whose _split_generators gives {split: iterable of examples}, written
    to array_record shards as they come, in that order (TFDS's writer is not
    used: see the module doc). Datasets it writes say disable_shuffling.
    byte_identical: records serialized in key order (SortedSerializer), so the same
    arguments give the same files in any process (the generated datasets promise it)."""

    byte_identical = False

    def refuse_other_settings(self, settings: str) -> None:
        """A dataset made from `settings` (a builder's options, written at the end of its
        description as "... from <settings>") is refused when it is already prepared
        from others: the same name must not hold two different datasets. Call after
        __init__ (TFDS's info then is this code's; the one on disk is read here)."""
        if not self.is_prepared():
            return
        written = json.loads((self.data_path / "dataset_info.json").read_text())
        description = written.get("description", "")
        if not description.endswith(" from " + settings):
            made_from = description.rsplit(" from ", 1)[-1]
            raise UserError(f"{self.name} in {self.data_path} was made from {made_from}, "
                            f"not {settings} as asked: delete that folder to prepare it "
                            "anew, or use another --data_dir.")

    # TFDS prints "Downloading and preparing dataset Unknown size (...)" before and
    # "Dataset ... downloaded and prepared" after; the prepare command says what it made.
    def _log_download_bytes(self) -> None:
        logging.info("Preparing %s in %s.", self.name, self.data_dir)

    def _log_download_done(self) -> None:
        pass

    def _generate_splits(self, dl_manager, download_config):
        del download_config  # none of its options apply
        if self.info.file_format.value != "array_record":
            raise ValueError(f"{self.name} is written as array_record only")
        features = self.info.features
        serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
        if self.byte_identical:
            serializer = SortedSerializer(serializer)
        return [self._write_split(split, examples, features, serializer)
                for split, examples in self._split_generators(dl_manager).items()]

    def _write_split(self, split, examples, features, serializer) -> splits_lib.SplitInfo:
        template = self._get_filename_template(split)  # in the incomplete.* folder
        paths, lengths, total, shard_bytes, writer = [], [], 0, 0, None
        try:
            for example in tfds_utils.tqdm(examples, desc=f"Writing {split}", unit=" images",
                                           leave=False, mininterval=1.0):
                record = serializer.serialize_example(features.encode_example(example))
                if writer is None or shard_bytes + len(record) > SHARD_BYTES:
                    if writer is not None:
                        writer.close()
                    paths.append(template.data_dir / f"{split}.shard{len(paths)}.tmp")
                    writer = array_record_module.ArrayRecordWriter(
                        os.fspath(paths[-1]), "group_size:1")  # TFDS's options
                    lengths.append(0)
                    shard_bytes = 0
                writer.write(record)
                lengths[-1] += 1
                shard_bytes += len(record)
                total += len(record)
        finally:
            if writer is not None:
                writer.close()
        if not paths:
            raise UserError(f"No images for split {split}: nothing to prepare.")
        for i, path in enumerate(paths):  # the shard count is known now
            path.rename(template.sharded_filepath(shard_index=i, num_shards=len(paths)))
        logging.info("Wrote %s: %d records in %d shard(s).", split, sum(lengths), len(paths))
        return splits_lib.SplitInfo(name=split, shard_lengths=lengths, num_bytes=total,
                                    filename_template=template)

    def _generate_examples(self, **unused):
        """Required by TFDS's abstract base; never called: _split_generators above
        writes every split itself (TFDS's writer needs TensorFlow past 1 GB)."""
        raise AssertionError("StreamingBuilder writes its splits in _split_generators")
