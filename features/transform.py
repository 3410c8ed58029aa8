"""The transform: a batch of state blobs -> model inputs, vectorised with numpy.

The online store and the offline builder both turn blobs (``AdmissionState.to_blob``)
into model inputs with ``assemble`` (through ``FittedFeatures.assemble``), so offline rows
go through byte-for-byte the same decoding and arithmetic as online reads.

Windowed reads: each item's prefixes in the blob cover its newest buckets ``J - r .. J``
(``features.state`` folds them, ``features.layout`` lays them out). A read is exact
whenever the scoring time is at or after every measurement in the state: always offline
(a snapshot folds only the events up to its cutoff, and a measurement's charttime is never
after its event time) and online at the default scoring time (the latest event). A window
of ``n`` buckets ending with the scoring time's bucket ``q`` is then one prefix,
``r = n - 1 - (q - J)`` (empty when negative), so a read picks one entry per item and
window: a gather, vectorised over the batch, whatever the number of windows. (Were the
scoring time's bucket before ``J``, online with an explicit earlier ``as_of``, the window
read is the one ending with ``J``.)

Serving blobs: ``serving_blobs`` stores ``assemble``'s output as of the latest applied
event when the state is written, and ``serving_inputs`` decodes a batch of them back: the
whole read at the default scoring time. Scoring as of another time goes through the blob.
"""

from __future__ import annotations

import functools

import numpy as np

from features import definitions as fd
from features import model_inputs as mi
from features.layout import (
    A_ADMIT,
    A_ITEMS,
    A_LAST_EVENT,
    N_ITEMS,
    P_COUNT,
    P_SUM,
    PREFIX,
    URI_INLINE,
    blob_dtype,
    serving_dtype,
)
from features.state import AdmissionState


@functools.lru_cache(maxsize=4)
def _empty_blob(note_tokens: int) -> bytes:
    """An unknown admission reads as one no event has reached."""
    return AdmissionState(note_tokens).to_blob()


@functools.lru_cache(maxsize=4)
def _empty_serving(note_tokens: int) -> bytes:
    """An unknown admission, as ``assemble`` has it: latest event -inf, nothing observed."""
    record = np.zeros(1, serving_dtype(note_tokens))
    record["as_of"] = -np.inf
    return record.tobytes()


def decode_blobs(blobs, note_tokens: int = mi.NOTE_TOKENS):
    """(present [B] bool, records [B] of ``blob_dtype``, uris [B] object) for a batch."""
    return _split_records(blobs, blob_dtype(note_tokens), _empty_blob(note_tokens))


def _split_records(blobs, dtype: np.dtype, empty: bytes):
    """(present, records of ``dtype``, the text after each record): a blob that is None, or
    too short for a record (never written so), reads as unknown (``empty``)."""
    size = dtype.itemsize
    # The only per-row Python: which rows were found, slicing off and decoding the URIs.
    found, heads, tails = [], [], []
    for blob in blobs:
        if blob is not None and len(blob) >= size:
            found.append(True)
            heads.append(blob[:size])
            tails.append(blob[size:].decode())
        else:
            found.append(False)
            heads.append(empty)
            tails.append("")
    records = np.frombuffer(b"".join(heads), dtype=dtype)
    return np.array(found, dtype=bool), records, np.array(tails, dtype=object)


def raw_numeric(records: np.ndarray, as_of: np.ndarray) -> np.ndarray:
    """Unnormalised ``NUMERIC_FEATURES`` [B, F] float64, NaN where missing."""
    raw = np.empty((len(records), fd.N_NUMERIC))
    static, since = fd.N_STATIC, fd.N_STATIC + 1 + N_ITEMS
    raw[:, :static] = records["static"]
    # Hours since admission, then hours since each item's latest measurement.
    anchors = records["anchors"]
    np.subtract(as_of, anchors[:, A_ADMIT], out=raw[:, static])
    np.subtract(as_of[:, None], anchors[:, A_ITEMS:], out=raw[:, static + 1 : since])
    windowed(records, as_of, out=raw[:, since:])
    return raw


def windowed(
    records: np.ndarray,
    as_of: np.ndarray,
    windows: tuple[int, ...] = fd.WINDOW_BUCKETS,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Per window (in buckets, at most N_BUCKETS), item and ``fd.WINDOW_STATS``, as of
    ``as_of``: [B, N_WINDOWED] float64, NaN where missing (a count is never missing).
    Windows end with ``as_of``'s bucket."""
    rows = len(records)
    width = N_ITEMS * PREFIX
    out = np.empty((rows, len(windows) * width)) if out is None else out
    # Every prefix of the batch, one per row, then a row for an empty window. A window
    # that reaches the item's newest bucket has at least that measurement in it.
    prefixes = np.empty((rows * N_ITEMS * fd.N_BUCKETS + 1, PREFIX), np.float32)
    prefixes[:-1].reshape(records["prefixes"].shape)[...] = records["prefixes"]
    prefixes[-1] = (0.0, np.nan, np.nan, np.nan)
    empty = len(prefixes) - 1
    # Each item's newest bucket, from its latest measurement's time (NaN: never measured).
    newest = np.floor(records["anchors"][:, A_ITEMS:] / fd.BUCKET_HOURS).ravel()
    behind = np.maximum(
        np.repeat(np.floor(as_of / fd.BUCKET_HOURS), N_ITEMS) - newest, 0.0
    )  # buckets
    first = np.arange(rows * N_ITEMS) * fd.N_BUCKETS  # each item's prefix 0
    for w, n in enumerate(windows):
        reach = n - 1 - behind  # the prefix this window is; NaN or negative: empty
        picked = np.take(
            prefixes, np.where(reach >= 0, first + reach, empty).astype(np.intp), axis=0
        )
        block = out[:, w * width : (w + 1) * width]
        block[...] = picked.reshape(rows, width)  # [B, items * (count, sum, min, max)]
        block[:, P_SUM::PREFIX] /= np.maximum(
            block[:, P_COUNT::PREFIX], 1.0
        )  # the mean; NaN stays NaN
    return out


def scoring_time(records: np.ndarray, as_of=None) -> np.ndarray:
    """Scoring time per row (epoch hours): given, or each admission's latest event time."""
    if as_of is None:
        return records["anchors"][:, A_LAST_EVENT].copy()
    return np.broadcast_to(np.asarray(as_of, dtype=np.float64), (len(records),)).copy()


def assemble(blobs, as_of, mean: np.ndarray, std: np.ndarray, note_tokens: int = mi.NOTE_TOKENS):
    """Model inputs for a batch of state blobs, as of ``as_of`` (epoch hours, per row or one).

    ``as_of=None`` scores each admission at its latest applied event time. Unknown
    admissions (``None``) get all-missing rows and ``present`` False.
    """
    present, records, uris = decode_blobs(blobs, note_tokens)
    when = scoring_time(records, as_of)
    raw = raw_numeric(records, when)
    if not present.all():
        raw[~present] = np.nan  # an unknown admission has no counts either
    missing = np.isnan(raw)
    numeric = np.subtract(raw, mean)
    np.divide(numeric, std, out=numeric)
    np.putmask(numeric, missing, 0.0)
    return {
        mi.NUMERIC: numeric.astype(np.float32),
        mi.NUMERIC_MASK: (~missing).astype(np.float32),
        **_text_inputs(records, uris),
        "numeric_raw": raw,
        "as_of": when,
        "present": present,
    }


def _text_inputs(records: np.ndarray, uris: np.ndarray) -> dict[str, np.ndarray]:
    rad = records["radiology"].astype(np.int64)
    dis = records["discharge"].astype(np.int64)
    modality = np.column_stack([rad[:, 0] != fd.PAD, dis[:, 0] != fd.PAD, uris != ""])
    return {
        mi.NOTES_RADIOLOGY: rad,
        mi.NOTES_DISCHARGE: dis,
        mi.MODALITY_MASK: modality.astype(np.float32),
        "cxr_uri": uris,
    }


def serving_blobs(inputs: dict[str, np.ndarray]) -> list[bytes]:
    """The serving blob of each row of ``assemble``'s output."""
    records = np.zeros(len(inputs["as_of"]), serving_dtype(inputs[mi.NOTES_RADIOLOGY].shape[1]))
    records["as_of"] = inputs["as_of"]
    records["numeric"] = inputs[mi.NUMERIC]
    records["observed"] = np.packbits(inputs[mi.NUMERIC_MASK] > 0, axis=1)
    records["radiology"] = inputs[mi.NOTES_RADIOLOGY]
    records["discharge"] = inputs[mi.NOTES_DISCHARGE]
    uris = [uri.encode() for uri in inputs["cxr_uri"]]
    # One that does not fit, or whose trailing NULs the field would drop, follows the record.
    inline = [len(uri) <= URI_INLINE and not uri.endswith(b"\0") for uri in uris]
    records["cxr_uri"] = [uri if fits else b"" for uri, fits in zip(uris, inline)]
    raw, size = records.tobytes(), records.itemsize
    return [
        raw[i * size : (i + 1) * size] + (b"" if fits else uri)
        for i, (uri, fits) in enumerate(zip(uris, inline))
    ]


def serving_inputs(blobs, note_tokens: int = mi.NOTE_TOKENS) -> dict[str, np.ndarray]:
    """``assemble``'s output at each admission's latest event (less ``numeric_raw``),
    decoded from serving blobs; unknown admissions (``None``) as ``assemble`` has them."""
    dtype, empty = serving_dtype(note_tokens), _empty_serving(note_tokens)
    rows = [empty if blob is None else blob for blob in blobs]
    if set(map(len, rows)) <= {dtype.itemsize}:  # the usual batch: one array, no per-row slicing
        present = np.array([blob is not None for blob in blobs], dtype=bool)
        records, long_uris = np.frombuffer(b"".join(rows), dtype), None
    else:
        present, records, long_uris = _split_records(blobs, dtype, empty)
    uris = np.array([uri.decode() for uri in records["cxr_uri"].tolist()], dtype=object)
    if long_uris is not None:
        uris = np.where(long_uris != "", long_uris, uris)
    observed = np.unpackbits(records["observed"], axis=1, count=fd.N_NUMERIC)
    return {
        mi.NUMERIC: np.ascontiguousarray(records["numeric"]),
        mi.NUMERIC_MASK: observed.astype(np.float32),
        **_text_inputs(records, uris),
        "as_of": records["as_of"].copy(),
        "present": present,
    }
