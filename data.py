"""Training data for DiT: image folders (ADM centre crop, square or H x W) and pre-extracted VAE feature shards.

Both datasets return unflipped samples; train.py draws the horizontal flip (and the latent
from the stored encoder distribution) itself from a per-step seed, so a run resumed from a
checkpoint, or split over a different number of processes, sees exactly the same data.

Unreadable images: a file with an image extension that cannot be decoded (or that PIL refuses as
a decompression bomb) is skipped with one warning naming it. Images held in memory are dropped
from the data set at load time; images read from disk on the fly are replaced by the next
readable image in the folder (so the data set keeps its length and order). Files without an
image extension are ignored, with one warning that counts them. Hidden files and folders (names
starting with ".": a killed writer's temp files, editor and OS files) are not read at all.
"""
import argparse
import json
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Sampler, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

import cli
from errors import UserError
from files import load_torch

IN_MEMORY_LIMIT = 1 << 30  # bytes: smaller image sets and feature sets are held in RAM
FEATURES_META = "features.json"  # written last by extract_features.py: its presence means complete
# What an image that cannot be used raises: PIL's UnidentifiedImageError and truncated files are
# OSErrors; an image over PIL's pixel limit (Image.MAX_IMAGE_PIXELS, doubled) a DecompressionBombError.
UNREADABLE_IMAGE = (OSError, Image.DecompressionBombError)


def adm_center_crop(image, image_size):
    """The ADM centre crop, for a square size N or [H, W] (height x width): halve with a box
    filter while the image is at least twice the target on both sides, bicubic-resize so the
    image just covers the target (for a square: the short side equals N), then crop the centre.
    For a square target this is exactly the reference's crop."""
    height, width = cli.height_width(image_size)
    while image.width >= 2 * width and image.height >= 2 * height:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = max(width / image.width, height / image.height)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def load_image(path, image_size, channels=3):
    """A cropped image as a uint8 (C, H, W) tensor; raises one of UNREADABLE_IMAGE when it cannot be used."""
    with Image.open(path) as image:
        image = image.convert("RGB" if channels == 3 else "L")
    array = np.asarray(adm_center_crop(image, image_size))
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def check_labels(num_found, num_classes, where):
    if num_classes is not None and num_found > num_classes:
        raise UserError(f"{where} has {num_found} classes, so labels reach {num_found - 1}, but --num-classes is "
                        f"{num_classes}; pass --num-classes {num_found} (or more)")


def class_folders(root):
    """The class sub-folders of an image folder, sorted (labels 0, 1, ...); hidden ones are not classes."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))


def batch_collate(batch):
    """Datasets with __getitems__ hand over ready batches; others get the default collation."""
    return batch if isinstance(batch, tuple) else default_collate(batch)


class ImageFolder(Dataset):
    """One sub-folder per class (sorted names give labels 0, 1, ...), as torchvision's ImageFolder.

    Items are (uint8 image (C, H, W), label). Small sets (under IN_MEMORY_LIMIT once cropped)
    are decoded once up front, so epochs over them cost no image decoding.
    """

    def __init__(self, root, image_size, channels=3, num_classes=None, in_memory=None, quiet=False):
        if not root or not os.path.isdir(root):
            raise FileNotFoundError(f"--data-path {root!r} is not a folder; point it at an image folder with one "
                                    f"sub-folder per class (e.g. imagenet/train)")
        self.root, self.image_size, self.channels, self.quiet = root, image_size, channels, quiet
        self.classes = class_folders(root)
        if not self.classes:
            raise UserError(f"--data-path {root!r} holds no class sub-folders; put the images in one sub-folder "
                            f"per class (a single sub-folder for unlabelled data)")
        samples, ignored = self._find_images()
        if ignored:
            self._warn(f"ignored {len(ignored)} file(s) without an image extension in {root}, e.g. {ignored[0]}")
        check_labels(len(self.classes), num_classes, f"--data-path {root!r}")
        self.paths = [p for p, _ in samples]
        self.listed = len(samples)  # image files found, readable or not: the count a resume compares (runs.py)
        self.labels = torch.tensor([y for _, y in samples], dtype=torch.long)
        self.warned = set()
        if in_memory is None:
            in_memory = len(self.paths) * channels * math.prod(cli.height_width(image_size)) <= IN_MEMORY_LIMIT
        self.images = self._load_all() if in_memory else None

    def _find_images(self):
        """([(path, label)] in torchvision's order, [files without an image extension]); refuses a class
        folder without images, naming it, as its label would never be trained."""
        ignored, empty, samples = [], [], []
        root_length = len(os.path.join(os.path.expanduser(self.root), "")) - 1  # as make_dataset joins paths

        def is_image(path):
            if os.sep + "." in path[root_length:]:  # a hidden file, or one inside a hidden folder
                return False
            if path.lower().endswith(IMG_EXTENSIONS):
                return True
            ignored.append(path)
            return False

        for label, name in enumerate(self.classes):  # class by class, to know which one is empty
            try:
                samples += make_dataset(self.root, {name: label}, is_valid_file=is_image)
            except FileNotFoundError:
                empty.append(name)
        extensions = ", ".join(IMG_EXTENSIONS)
        if not samples:
            raise UserError(f"--data-path {self.root!r} holds no images (extensions {extensions}) in its "
                            f"class sub-folders; check the path")
        if empty:
            others = f" (and {len(empty) - 1} other class folder(s))" if len(empty) > 1 else ""
            raise UserError(f"class folder {os.path.join(self.root, empty[0])!r}{others} holds no images (extensions "
                            f"{extensions}); add images to it or remove it, as each class folder is a label")
        return samples, ignored

    def _warn(self, message):
        if not self.quiet:
            warnings.warn(message, stacklevel=3)

    def _load_all(self):
        def load(path):
            try:
                return load_image(path, self.image_size, self.channels)
            except UNREADABLE_IMAGE as e:
                self._warn(f"skipping unreadable image {path} ({e})")
                return None

        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:  # PIL decodes without the GIL
            images = list(pool.map(load, self.paths))
        keep = [i for i, image in enumerate(images) if image is not None]
        if not keep:
            raise UserError(f"no image under --data-path {self.root!r} could be read; check the files")
        self.paths = [self.paths[i] for i in keep]
        self.labels = self.labels[keep]
        return torch.stack([images[i] for i in keep])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        if self.images is not None:
            return self.images[index], self.labels[index]
        for offset in range(len(self.paths)):
            i = (index + offset) % len(self.paths)
            try:
                return load_image(self.paths[i], self.image_size, self.channels), self.labels[i]
            except UNREADABLE_IMAGE as e:
                if i not in self.warned:
                    self.warned.add(i)
                    self._warn(f"skipping unreadable image {self.paths[i]} ({e}); using the next image instead")
        raise UserError(f"no image under --data-path {self.root!r} could be read; check the files")

    def __getitems__(self, indices):
        if self.images is None:
            return tuple(default_collate([self[i] for i in indices]))
        indices = torch.as_tensor(indices)
        return self.images[indices], self.labels[indices]


def shard_name(index):
    return f"shard-{index:05d}.pt"


class FeatureShards(Dataset):
    """Features written by extract_features.py: for each image, the VAE encoder's mean and
    standard deviation of the image and of its horizontal flip.

    Items are (mean (2, 4, h, w), std (2, 4, h, w), label); index 1 on the first axis is the
    flipped image. Large sets are memory-mapped, so processes on one machine share the pages.
    """

    @staticmethod
    def read_meta(root):
        meta_path = os.path.join(root or "", FEATURES_META)
        if not root or not os.path.isdir(root):
            raise FileNotFoundError(f"--feature-path {root!r} is not a folder; create it with extract_features.py")
        if not os.path.isfile(meta_path):
            raise UserError(f"--feature-path {root!r} has no {FEATURES_META}: extraction is missing or unfinished; "
                            f"run (or re-run, it resumes) extract_features.py with the same flags")
        with open(meta_path) as f:
            return json.load(f)

    def __init__(self, root, num_classes=None, entries=None):
        """entries: the shards to read (default: all the metadata lists; BucketedFeatures: one bucket's)."""
        self.meta = self.read_meta(root)
        check_labels(self.meta["num_classes"], num_classes, f"--feature-path {root!r}")
        shards = []
        for entry in self.meta["shards"] if entries is None else entries:
            path = os.path.join(root, entry["file"])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"feature shard {path} is missing; re-run extract_features.py to rebuild it")
            shard = load_torch(path, "feature shard", mmap=self.meta["bytes"] > IN_MEMORY_LIMIT,
                               fix="delete it and re-run extract_features.py")
            if len(shard["labels"]) != entry["count"]:
                raise UserError(f"feature shard {path} holds {len(shard['labels'])} images, expected "
                                f"{entry['count']}; delete it and re-run extract_features.py")
            shards.append(shard)
        if self.meta["bytes"] <= IN_MEMORY_LIMIT:  # one tensor each: batches become single index operations
            shards = [{k: torch.cat([s[k] for s in shards]) for k in ("mean", "std", "labels")}]
        self.shards = shards
        self.offsets = torch.tensor(np.cumsum([0] + [len(s["labels"]) for s in shards]))
        self.labels = torch.cat([s["labels"] for s in shards])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, index):
        batch = self.__getitems__([index])
        return batch[0][0], batch[1][0], batch[2][0]

    def __getitems__(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long)
        if len(self.shards) == 1:
            s = self.shards[0]
            return s["mean"][indices], s["std"][indices], s["labels"][indices]
        which = torch.searchsorted(self.offsets, indices, right=True) - 1
        first = self.shards[0]
        mean = torch.empty((len(indices), *first["mean"].shape[1:]), dtype=first["mean"].dtype)
        std = torch.empty_like(mean)
        for k in which.unique().tolist():
            rows = (which == k).nonzero().squeeze(1)
            local = indices[rows] - self.offsets[k]
            mean[rows] = self.shards[k]["mean"][local]
            std[rows] = self.shards[k]["std"][local]
        return mean, std, self.labels[indices]


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch) that can start an epoch part-way through.

    Rank r takes every world_size-th index of the epoch's permutation, so global batch k is
    the same set of images whatever the number of processes, and sample j of rank r sits at
    position r + j * world_size of that global batch.
    """

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        """skip: indices of this rank already consumed in this epoch (batches done x local batch)."""
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return max(0, self.num_samples - self.skip)


# ------------------------------------------------------------------ aspect-ratio buckets
def aspect_buckets(text):
    """--aspect-buckets: sizes HxW (or N for a square) separated by commas, e.g. 256x256,192x320,320x192;
    a list of cli.image_size values, in the order given (the first is the run's --image-size)."""
    sizes = [cli.image_size(part) for part in str(text).split(",") if part.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"{text!r} names no bucket; give sizes HxW separated by commas, "
                                         f"e.g. 256x256,192x320,320x192")
    if len({cli.height_width(size) for size in sizes}) < len(sizes):
        raise argparse.ArgumentTypeError(f"{text!r} names a bucket twice; give each size once")
    return sizes


def add_bucket_flag(parser):
    parser.add_argument("--aspect-buckets", type=aspect_buckets, default=None, metavar="HxW,HxW,...",
                        help="train on several image shapes: each image goes to the size nearest its aspect "
                             "ratio (resized and centre-cropped to it) and every global batch comes from one "
                             "size (default: off, one --image-size)")


def nearest_bucket(width, height, buckets):
    """The index of the bucket nearest an image's aspect ratio, by log aspect ratio (so 2:1 and 1:2
    are equally far from 1:1); the first of equally near ones."""
    distances = [abs(math.log(width / height) - math.log(w / h)) for h, w in map(cli.height_width, buckets)]
    return distances.index(min(distances))


def image_dimensions(path):
    """(width, height) from the file's header (no decoding); raises one of UNREADABLE_IMAGE."""
    with Image.open(path) as image:
        return image.size


class BucketedImages(Dataset):
    """An image folder (as ImageFolder: labels, hidden files, unreadable images) whose images are
    cropped to the bucket nearest their aspect ratio. Items are (uint8 (C, H, W), label);
    bucket_of[i] is image i's bucket. A batch (__getitems__) holds images of one bucket only.
    Images whose header cannot be read are dropped when the folder is listed."""

    def __init__(self, root, buckets, channels=3, num_classes=None, in_memory=None, quiet=False):
        listing = ImageFolder(root, buckets[0], channels, num_classes, in_memory=False, quiet=quiet)
        self.root, self.buckets, self.channels, self.classes = root, list(buckets), channels, listing.classes
        self.listed = listing.listed
        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            sizes = list(pool.map(self._dimensions, listing.paths))
        if not quiet and any(size is None for size in sizes):
            warnings.warn(f"skipping {sum(size is None for size in sizes)} unreadable image(s) in {root}", stacklevel=2)
        keep = [i for i, size in enumerate(sizes) if size is not None]
        if not keep:
            raise UserError(f"no image under --data-path {root!r} could be read; check the files")
        self.paths = [listing.paths[i] for i in keep]
        self.labels = listing.labels[keep]
        self.bucket_of = torch.tensor([nearest_bucket(*sizes[i], self.buckets) for i in keep], dtype=torch.long)
        pixels = sum(math.prod(cli.height_width(self.buckets[b])) for b in self.bucket_of.tolist())
        if in_memory is None:
            in_memory = pixels * channels <= IN_MEMORY_LIMIT
        self.images = [self._load(i) for i in range(len(self.paths))] if in_memory else None

    @staticmethod
    def _dimensions(path):
        try:
            return image_dimensions(path)
        except UNREADABLE_IMAGE:
            return None

    def _load(self, index):
        """Image `index`, or (unreadable when decoded) the next readable one of its bucket."""
        for i in self._bucket_from(index):
            try:
                return load_image(self.paths[i], self.buckets[self.bucket_of[i]], self.channels)
            except UNREADABLE_IMAGE as e:
                warnings.warn(f"skipping unreadable image {self.paths[i]} ({e}); using the next image of its "
                              f"bucket instead", stacklevel=2)
        raise UserError(f"no image of bucket {cli.size_text(self.buckets[self.bucket_of[index]])} under "
                        f"--data-path {self.root!r} could be read; check the files")

    def _bucket_from(self, index):
        """index, then the rest of its bucket from there on, wrapping round. Lazily: listing the bucket
        scans the whole data set, too slow to do for every image loaded."""
        yield index
        same = (self.bucket_of == self.bucket_of[index]).nonzero().squeeze(1).tolist()
        start = same.index(index)
        yield from same[start + 1:] + same[:start]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return (self.images[index] if self.images is not None else self._load(index)), self.labels[index]

    def __getitems__(self, indices):
        if len(self.bucket_of[indices].unique()) > 1:  # a bug in the sampler, not the user's
            raise RuntimeError(f"a batch mixes buckets: {self.bucket_of[indices].tolist()}")
        images = [self.images[i] if self.images is not None else self._load(i) for i in indices]
        return torch.stack(images), self.labels[torch.as_tensor(indices)]


class BucketedFeatures(Dataset):
    """Features extracted with --aspect-buckets: the metadata's "buckets" list each bucket's image
    size and latent shape, and each shard entry its bucket. Items are ordered bucket by bucket;
    items and batches as FeatureShards' (a batch holds one bucket only)."""

    def __init__(self, root, num_classes=None):
        self.meta = FeatureShards.read_meta(root)
        self.buckets = [bucket["image_size"] for bucket in self.meta["buckets"]]
        self.parts, counts = [], []
        for b in range(len(self.buckets)):
            entries = [entry for entry in self.meta["shards"] if entry["bucket"] == b]
            self.parts.append(FeatureShards(root, num_classes, entries) if entries else None)
            counts.append(len(self.parts[-1]) if entries else 0)
        self.bucket_of = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        self.offsets = torch.tensor(np.cumsum([0] + counts))
        self.labels = torch.cat([part.labels for part in self.parts if part is not None])

    def __len__(self):
        return len(self.bucket_of)

    def __getitem__(self, index):
        batch = self.__getitems__([index])
        return batch[0][0], batch[1][0], batch[2][0]

    def __getitems__(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long)
        which = self.bucket_of[indices].unique()
        if len(which) > 1:  # a bug in the sampler, not the user's
            raise RuntimeError(f"a batch mixes buckets: {self.bucket_of[indices].tolist()}")
        b = int(which[0])
        return self.parts[b].__getitems__(indices - self.offsets[b])


class BucketSampler(Sampler):
    """The indices of this rank's batches when every global batch comes from one bucket.

    An epoch is a pure function of (seed, epoch), as ResumableSampler's: a generator seeded by
    seed + epoch shuffles each bucket's images and cuts them into global batches (a bucket's last
    partial batch waits for a later epoch, with other images), then shuffles the order of all the
    epoch's batches. So each bucket gets its share of the steps (its image count over the global
    batch) in an order that differs every epoch; every rank computes the same batches; rank r takes
    positions r, r + world_size, ... of each (as step_randomness slices the step's draws), so the
    global batch does not depend on the number of processes; and a resume skips whole batches.
    """

    def __init__(self, bucket_of, global_batch, num_replicas, rank, seed):
        self.bucket_of, self.global_batch, self.seed = bucket_of, global_batch, seed
        self.num_replicas, self.rank, self.epoch, self.skip = num_replicas, rank, 0, 0
        self.local_batch = global_batch // num_replicas
        self.num_batches = sum(int(n) // global_batch for n in torch.bincount(bucket_of).tolist())
        self.num_samples = self.num_batches * self.local_batch  # per rank and epoch, as DistributedSampler's

    def set_epoch(self, epoch, skip=0):
        """skip: indices of this rank already consumed in this epoch (batches done x local batch)."""
        self.epoch, self.skip = epoch, skip

    def global_batches(self):
        """(batches, global batch size): the epoch's batches of dataset indices, in training order."""
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for b in range(int(self.bucket_of.max()) + 1):
            members = (self.bucket_of == b).nonzero().squeeze(1)
            members = members[torch.randperm(len(members), generator=gen)]
            full = len(members) // self.global_batch * self.global_batch
            batches.append(members[:full].view(-1, self.global_batch))
        batches = torch.cat(batches)
        return batches[torch.randperm(len(batches), generator=gen)]

    def __iter__(self):
        mine = self.global_batches()[self.skip // self.local_batch:, self.rank::self.num_replicas]
        return iter(mine.reshape(-1).tolist())

    def __len__(self):
        return max(0, self.num_samples - self.skip)
