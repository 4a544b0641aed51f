"""A unit's cached calibration inputs and outputs: in memory, in half precision, or in a file.

Reconstruction draws random batches from these caches thousands of times, so they are made once per
unit. They are also what runs a machine out of memory (QDrop issue #26): 1,024 samples of one
BERT layer's inputs, quantized inputs and outputs take 190 MB in float32. ``cache_dtype`` halves
that; ``cache_dir`` moves it into an unlinked temporary file that is read back a batch at a time, so
the process holds one batch of it (the OS may keep the file's pages in its page cache, which it
reclaims when memory is short).

An item is ``(float args, quantized args or None, kwargs, float output, token mask)`` for one cached
batch of rows; a merged image cache is one item of all rows.
"""
from __future__ import annotations

import bisect
import os
import tempfile

import torch

from .batches import CalibrationDataError, is_channels_last
from .quantizers import ActQuantizer, DropMasks


class NonFiniteActivationError(CalibrationDataError):
    """The float model produces NaN/inf on the calibration data."""


class SpillFile:
    """An unlinked temporary file that tensors are appended to; it is gone once nothing refers to it."""

    def __init__(self, directory: str):
        self.directory = directory
        self.file = tempfile.TemporaryFile(dir=directory)
        self.size = 0

    def write(self, tensor: torch.Tensor) -> "OnDisk":
        data = tensor.detach().cpu()
        channels_last = is_channels_last(data)  # written in its own memory order (rows outermost either way)
        flat = data.permute(0, 2, 3, 1) if channels_last else data.contiguous()
        view = memoryview(flat.reshape(-1).view(torch.uint8).numpy())
        offset, done = self.size, 0
        try:
            while done < len(view):
                done += os.pwrite(self.file.fileno(), view[done:], offset + done)
        except OSError as e:
            raise OSError(e.errno, f"cannot write the block cache to cache_dir {self.directory}: "
                                   f"{e.strerror}; {(self.size + len(view)) / 1e6:.0f} MB needed so far") from e
        self.size += len(view)
        return OnDisk(self, [(offset, data.shape[0])], data.shape, data.dtype, tensor.device, channels_last)


class OnDisk:
    """A tensor whose rows (dim 0) lie in a ``SpillFile``, in segments of ``(byte offset, rows)``.

    Concatenating along rows joins segment lists, so merging cached batches moves no data. A
    channels-last tensor is stored and read back in that memory order.
    """

    def __init__(self, spill: SpillFile, segments: list[tuple[int, int]], shape: torch.Size, dtype: torch.dtype,
                 device: torch.device, channels_last: bool = False):
        self.spill, self.segments, self.shape, self.dtype, self.device = spill, segments, torch.Size(shape), dtype, device
        self.channels_last = channels_last
        self.row_bytes = self.shape[1:].numel() * dtype.itemsize
        self.starts = [0]  # first row of each segment
        for _, rows in segments:
            self.starts.append(self.starts[-1] + rows)

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize

    @staticmethod
    def cat(parts: list["OnDisk"]) -> "OnDisk":
        rows = sum(p.shape[0] for p in parts)
        return OnDisk(parts[0].spill, [s for p in parts for s in p.segments], (rows,) + tuple(parts[0].shape[1:]),
                      parts[0].dtype, parts[0].device, parts[0].channels_last)

    def load(self, rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, or its ``rows`` (a slice or an index tensor), read from the file."""
        n = self.shape[0]
        wanted = range(n)[rows] if isinstance(rows, slice) else range(n) if rows is None else rows.tolist()
        row_shape = tuple(self.shape[1:])
        if self.channels_last:
            row_shape = row_shape[1:] + row_shape[:1]  # (H, W, C)
        out = torch.empty((len(wanted),) + row_shape, dtype=self.dtype)
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        runs: list[list[int]] = []  # [first wanted position, segment, first row, rows]: read at once
        for i, row in enumerate(wanted):
            if runs and row == runs[-1][2] + runs[-1][3] and row < self.starts[runs[-1][1] + 1]:
                runs[-1][3] += 1  # the next row of the same segment
            else:
                runs.append([i, bisect.bisect_right(self.starts, row) - 1, row, 1])
        fd = self.spill.file.fileno()
        for i, seg, row, count in runs:
            offset = self.segments[seg][0] + (row - self.starts[seg]) * self.row_bytes
            target = buffer[i * self.row_bytes:(i + count) * self.row_bytes]
            done = 0
            while done < len(target):
                done += os.preadv(fd, [target[done:]], offset + done)
        return (out.permute(0, 3, 1, 2) if self.channels_last else out).to(self.device)


class BlockCache:
    """A unit's cached float inputs, quantized-model inputs (only where they differ) and float outputs.

    Batches are stored as they are captured (``add``, ``add_quantized``), so the full-precision
    records of a whole cache never exist at once. With ``dtype`` (``QDropConfig.cache_dtype``) inputs
    and outputs are stored in that (half) precision; with ``spill_dir`` (``QDropConfig.cache_dir``) in
    a temporary file there. Either way they come back in the compute precision a batch or a chunk at
    a time (``sample``, ``parts``, ``chunks``).
    """

    def __init__(self, dtype: torch.dtype | None = None, chunk: int = 32, spill_dir: str | None = None,
                 name: str = "the block"):
        self.name = name  # the unit's, for errors
        self.items = []
        self.store_dtype = dtype
        self.dtype = self.device = None  # the compute precision and device, those of the first stored output
        self.chunk = chunk
        self.spill = SpillFile(spill_dir) if spill_dir is not None else None
        # QDropConfig.input_drop="unquantized": the stored quantized-model input is the value before the
        # activation quantizer that feeds the unit, which ``inputs`` applies (and drops element-wise)
        self.input_quantizer: ActQuantizer | None = None

    @classmethod
    def of(cls, records, quant_records=None, **kwargs) -> "BlockCache":
        """A cache of float ``records`` and, when given, the quantized model's records for the same batches."""
        cache = cls(**kwargs)
        for record in records:
            cache.add(record)
        for index, record in enumerate(quant_records or ()):
            cache.add_quantized(index, record["args"])
        return cache

    def add(self, record: dict, quant_args: tuple | None = None) -> None:
        """Store one cached batch: a float ``record`` (args, kwargs, output, mask) and, when given, the
        quantized model's args for it. NaN/inf in the float inputs or output are refused here, naming
        the unit, before anything is stored (inputs already stored, i.e. a previous unit's checked
        outputs reused by ``follow``, are not read back)."""
        output = record["output"]
        for what, t in [("input", a) for a in record["args"] if isinstance(a, torch.Tensor)] + [("output", output)]:
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise NonFiniteActivationError(
                    f"the float model's activations are NaN/inf at the {what} of {self.name}: check the model "
                    "and the calibration data (e.g. fp16 overflow, unnormalised inputs)")
        if self.dtype is None:
            self.dtype, self.device = output.dtype, output.device
        n = output.shape[0]
        self.items.append((self._stored(record["args"], n), None, record["kwargs"], self._stored(output, n),
                           record["mask"]))
        if quant_args is not None:
            self.add_quantized(len(self.items) - 1, quant_args)

    def add_quantized(self, index: int, quant_args: tuple) -> None:
        """Store the quantized model's args for cached batch ``index``; those equal to the float args
        (in stored precision) are not kept twice."""
        fp_args, _, kwargs, target, mask = self.items[index]
        cast = _to(tuple(quant_args), self.store_dtype)
        kept = tuple(q if isinstance(q, torch.Tensor) and q.is_floating_point() and not _stored_equal(q, f) else None
                     for q, f in zip(cast, fp_args))
        self.items[index] = (fp_args, _spilled(kept, target.shape[0], self.spill), kwargs, target, mask)

    def _stored(self, obj, n: int):
        return _spilled(_to(obj, self.store_dtype), n, self.spill)

    def restored(self, item, rows: slice | torch.Tensor | None = None):
        """``item``, or its ``rows``, with stored inputs and outputs back in compute precision and memory."""
        fp_args, q_args, kwargs, target, mask = item
        n = target.shape[0]
        pick = (lambda obj: obj) if rows is None else (lambda obj: _rows(obj, rows, n))
        return (_loaded(fp_args, rows, n, self.dtype), _loaded(q_args, rows, n, self.dtype), pick(kwargs),
                _loaded(target, rows, n, self.dtype), pick(mask))

    def parts(self, item):
        """``item``'s rows, ``self.chunk`` at a time, restored."""
        n = item[3].shape[0]
        for start in range(0, n, self.chunk):
            yield self.restored(item, slice(start, start + self.chunk) if self.chunk < n else None)

    def chunks(self, limit: int | None = None):
        """All cached rows as restored items of at most ``self.chunk`` rows; with ``limit``, only the
        first cached items that hold ``limit`` rows (a merged cache is one item: all of it)."""
        seen = 0
        for item in self.items:
            if limit is not None and seen >= limit:
                return
            seen += item[3].shape[0]
            yield from self.parts(item)

    def inputs(self, item, input_masks: DropMasks | None = None):
        """Block inputs of one restored batch: quantized-model inputs, kept where ``input_masks`` says;
        a dropped element is the float input's, or with ``input_quantizer`` the unquantized value's."""
        fp_args, q_args, kwargs, target, mask = item
        if q_args is None and self.input_quantizer is None:
            return fp_args, kwargs
        args = []
        for i, (f, q) in enumerate(zip(fp_args, q_args or (None,) * len(fp_args))):
            if i == 0 and self.input_quantizer is not None:  # (an unquantized input equal to the float one is not stored)
                q = self.input_quantizer.quantize(f if q is None else q, input_masks)
            elif q is not None and input_masks is not None:
                q = input_masks.mix(q, f)
            args.append(f if q is None else q)
        return tuple(args), kwargs

    def sample(self, batch_size: int, index_gen: torch.Generator):
        """A random cached batch, cut to ``batch_size`` random rows, restored."""
        item = self.items[int(torch.randint(len(self.items), (1,), generator=index_gen))]
        n = item[3].shape[0]
        if n <= batch_size:
            return self.restored(item)
        idx = torch.randperm(n, generator=index_gen)[:batch_size]
        return self.restored(item, idx if isinstance(item[3], OnDisk) else idx.to(item[3].device))

    def nbytes(self) -> int:
        """Bytes of the cached tensors (inputs, quantized inputs, outputs, masks), in memory or on disk."""
        seen, total = set(), 0
        for t in _tensors(self.items):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.nbytes
        return total

    def merged(self) -> "BlockCache":
        """One item of all rows (drawn from at random) when all cached batches share shapes."""
        shapes = {tuple(_shapes(item)) for item in self.items}
        if len(shapes) != 1 or len(self.items) == 1:
            return self
        self.items = [_concat(self.items)]
        return self


def micro_batches(item, size: int | None) -> list:
    """A restored ``item``'s rows cut into chunks of at most ``size`` samples (the whole item when ``size`` is None)."""
    n = item[3].shape[0]
    if size is None or size >= n:
        return [item]
    return [_rows(item, slice(start, start + size), n) for start in range(0, n, size)]


def _rows(obj, idx, n):
    """Index (or slice) the per-sample rows (leading dim == n) of every in-memory tensor in ``obj``."""
    if isinstance(obj, torch.Tensor):
        return obj[idx] if obj.dim() and obj.shape[0] == n else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rows(v, idx, n) for v in obj)
    if isinstance(obj, dict):
        return {k: _rows(v, idx, n) for k, v in obj.items()}
    return obj


def _to(obj, dtype: torch.dtype | None):
    """``obj`` with its floating-point tensors in ``dtype`` (unchanged when ``dtype`` is None)."""
    if dtype is None or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        if not obj.is_floating_point() or obj.dtype == dtype:
            return obj
        cast = obj.to(dtype)
        # what the narrower type cannot hold (an additive attention mask at float32's minimum) stays as it is
        return cast if obj.itemsize <= cast.itemsize or torch.isfinite(cast).all() or not torch.isfinite(obj).all() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, dtype) for v in obj)
    return obj


def _spilled(obj, n: int, spill: SpillFile | None):
    """``obj`` with its per-sample floating-point tensors written to ``spill`` (unchanged without one)."""
    if spill is None or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return spill.write(obj) if obj.is_floating_point() and obj.dim() and obj.shape[0] == n else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_spilled(v, n, spill) for v in obj)
    return obj


def _loaded(obj, rows, n: int, dtype: torch.dtype):
    """``obj`` (its ``rows`` when given) in memory, floating-point tensors in ``dtype``."""
    if obj is None:
        return None
    if isinstance(obj, OnDisk):
        obj = obj.load(rows)
    elif isinstance(obj, torch.Tensor):
        obj = obj[rows] if rows is not None and obj.dim() and obj.shape[0] == n else obj
    elif isinstance(obj, (list, tuple)):
        return type(obj)(_loaded(v, rows, n, dtype) for v in obj)
    else:
        return obj
    return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj


def _stored_equal(q: torch.Tensor, f) -> bool:
    """Whether a quantized-model input, in stored precision, equals the stored float input (then it is not kept)."""
    if isinstance(f, OnDisk):
        if f.shape != q.shape or f.dtype != q.dtype:
            return False
        step = max(1, (64 << 20) // max(f.row_bytes, 1))  # compared 64 MB at a time
        return all(torch.equal(q[s:s + step].cpu(), f.load(slice(s, s + step)).cpu()) for s in range(0, q.shape[0], step))
    return isinstance(f, torch.Tensor) and f.dtype == q.dtype and torch.equal(q, f)


def _tensors(obj):
    if isinstance(obj, (torch.Tensor, OnDisk)):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def _shapes(obj):
    if isinstance(obj, (torch.Tensor, OnDisk)):
        yield tuple(obj.shape[1:]), obj.dtype, type(obj)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _shapes(v)
    elif isinstance(obj, dict):
        for k in sorted(obj):
            yield k
            yield from _shapes(obj[k])
    else:
        yield obj


def _concat(items):
    first = items[0]
    if isinstance(first, OnDisk):
        return OnDisk.cat(items)
    if isinstance(first, torch.Tensor):
        return torch.cat(items) if first.dim() else first
    if isinstance(first, (list, tuple)):
        return type(first)(_concat(list(parts)) for parts in zip(*items))
    if isinstance(first, dict):
        return {k: _concat([it[k] for it in items]) for k in first}
    return first
