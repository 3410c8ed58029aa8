"""Scoring M3T-LM on Triton from the online feature store.

Two paths give the same numbers, on Triton or, for development, in-process with ONNX
Runtime on the same published ONNX files (``backend="onnx"``):

* ``FullModelScorer``: every rescoring runs the whole model (``m3t_lm``), X-ray decode
  included. Its base, ``ModelScorer``, sends the batch's arrays to one model as they are.
* ``CachedEncoderScorer``: the per-modality encoders run only when their input changed (a
  new X-ray: the X-ray encoder once; a new note: the notes encoder once); their embeddings
  are cached in Redis. A numeric update re-runs only the numeric encoder and the fusion
  head, in one call (``m3t_rescore``).

A chest X-ray that cannot be read or decoded is scored as absent (its ``modality_mask``
flag cleared), exactly as the offline builder treats it. X-rays are read only under the
settings' image roots and limits (``features.cxr.ImageAccess``). One that is not there yet
(``not_found``) or whose read stalled (``read_timeout``) is not recorded as absent at once:
the admission is scored without it and offered for another try (``retries_due``) with
backoff, for ``settings.images.missing_retry_s``; only then is it recorded (and cached) as
absent. Images scored as absent are counted by reason (``image_errors``).
``build_scoring`` builds the stream worker's (features, scorer) pair from the published
feature set.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from features import model_inputs as mi
from m3t.clients import triton_client
from m3t.settings import Settings

_NP_TO_TRITON = {
    np.dtype("float32"): "FP32",
    np.dtype("int64"): "INT64",
    np.dtype("uint8"): "UINT8",
}
EMB_KEY = "m3t:emb:{{{hadm_id}}}"
# Embeddings (and an X-ray recorded as absent) are kept this long after the last change.
EMB_TTL_S = 7 * 24 * 3600
CXR_COLUMN = mi.MODALITIES.index("cxr")
# A missing X-ray is tried again after 1 s, then 2, 4, ... at most a minute apart.
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 60.0

log = logging.getLogger(__name__)


class TritonModel:
    """One model on Triton. Checked once (ready, I/O, max batch); a batch larger than
    ``max_batch_size`` is split and its chunks are kept in flight together."""

    def __init__(
        self, client: grpcclient.InferenceServerClient, name: str, timeout_s: float = 10.0
    ):
        if not client.is_model_ready(name):
            raise RuntimeError(f"Triton model {name!r} is not ready")
        self.client, self.name, self.timeout_s = client, name, timeout_s
        config = client.get_model_config(name, as_json=True)["config"]
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.widths = {o["name"]: int(o["dims"][-1]) for o in config["output"]}
        self.max_batch = int(config.get("max_batch_size", 0)) or 1 << 30
        versions = client.get_model_metadata(name, as_json=True).get("versions", ["?"])
        self.version = max(versions, key=lambda v: int(v) if v.isdigit() else -1)

    def infer(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self.inputs) - set(arrays)
        if missing:
            raise ValueError(f"{self.name} needs inputs {sorted(missing)}")
        n = len(arrays[self.inputs[0]])
        chunks = [
            {name: arrays[name][start : start + self.max_batch] for name in self.inputs}
            for start in range(0, n, self.max_batch)
        ]
        results = self.requests(chunks)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return {o: np.concatenate([r.as_numpy(o) for r in results]) for o in self.outputs}

    def requests(self, requests: list[dict[str, np.ndarray]]) -> list:
        """Each dict as one request, all in flight together: each one's result, or its error."""
        results: list = [None] * len(requests)
        done = threading.Semaphore(0)

        def callback(index, result, error):
            results[index] = error or result
            done.release()

        for index, arrays in enumerate(requests):
            tensors = []
            for name, array in arrays.items():
                array = np.ascontiguousarray(array)
                tensor = grpcclient.InferInput(name, array.shape, _NP_TO_TRITON[array.dtype])
                tensor.set_data_from_numpy(array)
                tensors.append(tensor)
            self.client.async_infer(
                # tritonclient calls back with keywords: callback(result=..., error=...)
                self.name,
                tensors,
                callback=functools.partial(callback, index),
                outputs=[grpcclient.InferRequestedOutput(o) for o in self.outputs],
                client_timeout=self.timeout_s,
            )
        for _ in requests:
            # client_timeout bounds each request; this bounds a callback that never comes.
            if not done.acquire(timeout=self.timeout_s + 5):
                raise InferenceServerException(  # an outage: Triton's, not the batch's
                    f"{self.name}: no answer from Triton within {self.timeout_s + 5:.0f}s",
                    status=OUTAGE_STATUSES[1],
                )
        return results


class OnnxModel:
    """A published model version run in-process with ONNX Runtime: what Triton serves,
    without a server (development). Same interface as ``TritonModel``."""

    def __init__(self, repo: Path, name: str, version: str = "", threads: int = 1):
        from m3t.onnx_runtime import onnx_session

        folder = repo / name
        published = (
            sorted(
                int(v.name)
                for v in folder.iterdir()
                if v.name.isdigit() and (v / "model.onnx").exists()
            )
            if folder.is_dir()
            else []
        )
        if not published:
            raise RuntimeError(f"no published ONNX version of {name!r} in {repo}")
        self.name, self.version = name, version or str(published[-1])
        self.session = onnx_session(folder / self.version / "model.onnx", threads)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.widths = {o.name: int(o.shape[-1]) for o in self.session.get_outputs()}

    def infer(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(
            self.outputs, {k: np.ascontiguousarray(arrays[k]) for k in self.inputs}
        )
        return dict(zip(self.outputs, values))


def open_model(settings: Settings, name: str, backend: str = "triton"):
    """``name`` on the Triton server, or its latest published version in-process."""
    if backend == "triton":
        return TritonModel(triton_client(settings), name, settings.triton.timeout_s)
    if backend == "onnx":
        return OnnxModel(settings.model_repo, name, settings.triton.model_version)
    raise ValueError(f"backend must be triton or onnx, not {backend!r}")


class OnlineFeatures:
    """The stream worker's view of ``features.online.OnlineStore``."""

    def __init__(self, store):
        self.store = store

    def apply(self, events: list) -> list:
        """Apply events; returns those the store refused, each with its reason."""
        return self.store.write_batch(events).refused

    def inputs(self, hadm_ids: list[int]) -> tuple[dict, list[float]]:
        arrays = self.store.read_inputs(hadm_ids)
        arrays["hadm_id"] = np.asarray(hadm_ids, dtype=np.int64)
        return arrays, (arrays["as_of"] * 3600.0).tolist()  # epoch hours -> epoch seconds


class CxrInputs:
    """URIs -> the ``cxr`` tensor through the DALI pipeline, and which images decoded.

    ``access`` (``features.cxr.ImageAccess``): where images may be read from; the scorers
    pass their settings' on each call. None reads any path (tests that vouch for theirs).
    """

    def __init__(self, preprocessor=None, access=None):
        from features.cxr import CxrPreprocessor

        self.preprocessor = preprocessor or CxrPreprocessor()
        self.access = access

    def __call__(
        self, uris, access=None, reasons: dict[int, str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(tensors, decoded) per row; ``reasons`` (if given) gets each failed row's reason."""
        from features.cxr import preprocess_each

        uris = [u or "" for u in np.asarray(uris, dtype=object).tolist()]
        wanted = sorted({u for u in uris if u})
        images, ok, failed = preprocess_each(
            wanted, self.preprocessor, access=access or self.access
        )
        position = {u: i for i, u in enumerate(wanted)}
        size = self.preprocessor.size
        tensors = np.zeros((len(uris), 1, size, size), np.float32)
        decoded = np.zeros(len(uris), bool)
        for row, uri in enumerate(uris):
            if uri and ok[position[uri]]:
                tensors[row], decoded[row] = images[position[uri]], True
            elif uri and reasons is not None:
                reasons[row] = failed.get(position[uri], "decode_failed")
        return tensors, decoded


@dataclass
class _Miss:
    stamp: object  # the image it was (its URI, or a stamp of it)
    first: float  # when it was first missed
    wait_s: float  # the current backoff
    next_at: float  # when it is due another try


class MissingImages:
    """X-rays not there yet: each admission's next try, with backoff, until ``retry_s`` have
    passed since its image was first missed; then the image is given up (recorded as absent)
    and stays given up (for the same image) until forgotten.

    ``missed`` says whether a miss is still awaited; ``due`` lists the admissions to try now.
    At most ``limit`` admissions are awaited; past that, a miss is given up at once. The
    scoring thread reports misses while the worker's loop asks what is due: both lock.
    """

    def __init__(
        self,
        retry_s: float,
        first_s: float = RETRY_FIRST_S,
        max_s: float = RETRY_MAX_S,
        limit: int = 100_000,
    ):
        self.retry_s, self.first_s, self.max_s, self.limit = retry_s, first_s, max_s, limit
        self.awaited: dict[int, _Miss] = {}
        self.given_up: dict[int, object] = {}  # hadm_id -> the image given up (oldest first)
        self._lock = threading.Lock()

    def missed(self, hadm_id: int, stamp, now: float) -> bool:
        """One more miss of ``hadm_id``'s image ``stamp``: True while it is still awaited
        (score it absent, record nothing), False once it is given up (record it absent)."""
        with self._lock:
            return self._missed(hadm_id, stamp, now)

    def _missed(self, hadm_id: int, stamp, now: float) -> bool:
        if self.given_up.get(hadm_id) == stamp:
            return False
        miss = self.awaited.get(hadm_id)
        if miss is None or miss.stamp != stamp:  # a first miss, or a new image
            if self.retry_s <= 0 or (miss is None and len(self.awaited) >= self.limit):
                return self._give_up(hadm_id, stamp)
            first = min(self.first_s, self.retry_s)
            self.awaited[hadm_id] = _Miss(stamp, now, first, now + first)
            return True
        if now - miss.first >= self.retry_s:
            return self._give_up(hadm_id, stamp)
        return True

    def found(self, hadm_id: int) -> None:
        with self._lock:
            self.awaited.pop(hadm_id, None)
            self.given_up.pop(hadm_id, None)

    def _give_up(self, hadm_id: int, stamp) -> bool:
        self.awaited.pop(hadm_id, None)
        self.given_up.pop(hadm_id, None)
        self.given_up[hadm_id] = stamp
        while len(self.given_up) > self.limit:
            del self.given_up[next(iter(self.given_up))]
        return False

    def due(self, now: float) -> list[int]:
        """Admissions whose image should be tried again now; each is then scheduled for its
        next try (twice the wait, at most ``max_s``, the last one at ``retry_s``). One not
        tried by a minute after its last try is forgotten (a new miss starts over)."""
        with self._lock:
            return self._due(now)

    def _due(self, now: float) -> list[int]:
        due = []
        for hadm_id, miss in list(self.awaited.items()):
            if miss.next_at > now:
                continue
            deadline = miss.first + self.retry_s
            if now >= deadline + self.max_s:
                del self.awaited[hadm_id]  # nobody scored it again: nothing to record
                continue
            due.append(hadm_id)
            miss.wait_s = min(miss.wait_s * 2, self.max_s)
            miss.next_at = now + miss.wait_s if now < deadline else now + self.max_s
            if now < deadline:
                miss.next_at = min(miss.next_at, deadline)
        return sorted(due)


class XrayOutcomes:
    """What became of the X-rays a scorer read: the transient misses it awaits
    (``missing``), and the images scored as absent, counted by reason (``errors``) and
    logged (the reason and the count, nothing about the patient or the file), once per
    reason at 1, 2, 4, 8, ... occurrences."""

    def __init__(self, retry_s: float, clock: Callable[[], float] = time.time):
        self.missing = MissingImages(retry_s)
        self.errors: Counter[str] = Counter()
        self.clock = clock

    def settle(self, hadm_ids: list[int], stamps: list, rows, failed: dict[int, str]) -> set[int]:
        """The outcome of reading ``rows``' images (``failed``: row -> reason); returns the
        rows whose image is still awaited: scored absent now, not to be recorded."""
        from features.cxr import TRANSIENT

        now = self.clock()
        awaited = set()
        for row in rows:
            reason = failed.get(row)
            if reason is None:
                self.missing.found(hadm_ids[row])
            elif reason in TRANSIENT and self.missing.missed(hadm_ids[row], stamps[row], now):
                awaited.add(row)
            else:
                self.absent(reason)
        return awaited

    def absent(self, reason: str) -> None:
        self.errors[reason] += 1
        count = self.errors[reason]
        if count & (count - 1) == 0:
            log.warning("chest X-ray scored as absent: %s (%d so far)", reason, count)


CXR_EMBED = "m3t_cxr_embed"  # trainer.publish's ensemble: image bytes -> DALI -> m3t_enc_cxr
OUTAGE_STATUSES = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")


class TritonCxrEmbedder:
    """Chest X-rays -> ``emb_cxr`` on Triton: each image's compressed bytes go to the
    ``m3t_cxr_embed`` ensemble (the DALI backend decodes and preprocesses, then
    ``m3t_enc_cxr``), one request per image so Triton batches images of any size together.

    What the bytes pipeline cannot take, pixels (uncompressed or deeper than 8-bit DICOM),
    goes, as loaded, through ``fallback`` (the worker's own DALI pipeline and encoder). The DALI
    backend fails a whole batch on one bad image, so bytes are checked first
    (``check_encoded``) and a failed request is retried once on its own before its image
    counts as undecodable.
    """

    def __init__(
        self,
        client: grpcclient.InferenceServerClient,
        fallback,
        name: str = CXR_EMBED,
        timeout_s: float = 10.0,
        access=None,
    ):
        self.model = TritonModel(client, name, timeout_s)
        (self.input,) = self.model.inputs
        self.fallback = fallback
        self.access = access  # features.cxr.ImageAccess: where images may be read from
        self.sent = 0  # requests sent (for tests and benchmarks)

    def __call__(
        self, uris: list[str], reasons: dict[int, str] | None = None
    ) -> dict[str, np.ndarray]:
        """``emb_cxr`` and ``cxr_ok`` per URI; ``reasons`` (if given) gets each failed
        image's reason by index."""
        from features.cxr import BadImage, Encoded, check_encoded, read_images

        reasons = {} if reasons is None else reasons
        width = self.model.widths[mi.EMB_CXR]
        emb = np.zeros((len(uris), width), np.float32)
        ok = np.zeros(len(uris), np.float32)
        encoded, pixels = [], []
        for i, item in enumerate(read_images(uris, access=self.access)):
            try:
                if isinstance(item, BadImage):
                    raise item
                if isinstance(item, Encoded):
                    check_encoded(item.data)
                    encoded.append((i, np.frombuffer(item.data, np.uint8)[None]))
                else:
                    pixels.append((i, item))
            except BadImage as exc:  # absent: the fusion head's placeholder, as offline
                reasons[i] = str(exc)
        results = self._infer_each([data for _, data in encoded])
        for j in (j for j, r in enumerate(results) if r is None):  # perhaps a neighbour's failure
            results[j] = self._infer_each([encoded[j][1]])[0]
        for (i, _), result in zip(encoded, results):
            if result is not None:
                emb[i], ok[i] = result, 1.0
            else:
                reasons[i] = "decode_failed"
        if pixels:
            rows = [i for i, _ in pixels]
            local = self.fallback([item for _, item in pixels])
            emb[rows], ok[rows] = local[mi.EMB_CXR], local["cxr_ok"][:, 0]
            reasons.update({i: "decode_failed" for i in rows if not ok[i]})
        return {mi.EMB_CXR: emb, "cxr_ok": ok[:, None]}

    def _infer_each(self, blobs: list[np.ndarray]) -> list[np.ndarray | None]:
        """One request per image, all in flight together; None where one failed."""
        self.sent += len(blobs)
        out = []
        for result in self.model.requests([{self.input: data} for data in blobs]):
            if not isinstance(result, Exception):
                out.append(result.as_numpy(mi.EMB_CXR)[0])
            elif result.status() in OUTAGE_STATUSES:
                raise result  # the server, not the image: the caller must back off
            else:
                out.append(None)
        return out


def _mask_with_decoded(inputs: dict, decoded: np.ndarray) -> np.ndarray:
    mask = inputs[mi.MODALITY_MASK].astype(np.float32, copy=True)
    mask[:, CXR_COLUMN] *= decoded
    return mask


class ModelScorer:
    """One model scores the batch in one call, the batch's arrays sent as they are (no X-ray
    decode). On Triton the model is checked once (ready, I/O, max batch) when it is opened."""

    def __init__(self, settings: Settings, name: str, backend: str = "triton"):
        self.net = open_model(settings, name, backend)
        self.model = f"{self.net.name}:{self.net.version}"

    def arrays(self, inputs: dict) -> dict:
        """The model's inputs from the batch's."""
        return inputs

    def score(self, inputs: dict) -> tuple[np.ndarray, np.ndarray]:
        out = self.net.infer(self.arrays(inputs))
        return out[mi.LOS_DAYS].reshape(-1), out[mi.MORTALITY].reshape(-1)

    def close(self) -> None:
        client = getattr(self.net, "client", None)  # on Triton: this scorer's own client
        if client is not None:
            client.close()


class FullModelScorer(ModelScorer):
    """The whole model (``settings.triton.model_name``), the X-ray URIs decoded into its
    ``cxr`` input first (every time: a missing X-ray is found by the next rescoring that
    reads it; ``retries_due`` says when)."""

    def __init__(
        self,
        settings: Settings,
        cxr: CxrInputs | None = None,
        backend: str = "triton",
        clock: Callable[[], float] = time.time,
    ):
        from features.cxr import ImageAccess

        super().__init__(settings, settings.triton.model_name, backend)
        self.cxr = cxr or CxrInputs()
        self.access = ImageAccess.from_settings(settings)
        self.xrays = XrayOutcomes(settings.images.missing_retry_s, clock)
        self.image_errors = self.xrays.errors  # X-rays scored as absent, by reason

    def arrays(self, inputs: dict) -> dict:
        uris = [u or "" for u in np.asarray(inputs["cxr_uri"], dtype=object).tolist()]
        failed: dict[int, str] = {}
        tensors, decoded = self.cxr(uris, access=self.access, reasons=failed)
        rows = [i for i, uri in enumerate(uris) if uri]
        self.xrays.settle(inputs["hadm_id"].tolist(), uris, rows, failed)
        return {**inputs, mi.CXR: tensors, mi.MODALITY_MASK: _mask_with_decoded(inputs, decoded)}

    def retries_due(self, now: float) -> list[int]:
        """Admissions whose X-ray was missing and should be read (scored) again now."""
        return self.xrays.missing.due(now)


def _stamp(version: str, *rows) -> bytes:
    digest = hashlib.blake2b(version.encode(), digest_size=12)
    for row in rows:
        digest.update(row.encode() if isinstance(row, str) else np.ascontiguousarray(row).tobytes())
    return digest.digest()


class CachedEncoderScorer:
    """Encoders + fusion on Triton, with note and X-ray embeddings cached per admission.

    Each cached modality carries a stamp of the input and encoder version it came from (the
    token ids; the X-ray URI) and is reused while the stamp matches. An encoder does not run
    at all for an admission that lacks its modality: the fusion head replaces an absent
    embedding by its learned placeholder, whatever the embedding holds.
    """

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        cxr: CxrInputs | None = None,
        backend: str = "triton",
        prefix: str = "m3t_",
        cxr_pipeline: str | None = None,
        clock: Callable[[], float] = time.time,
    ):
        from features.cxr import ImageAccess

        self.redis = client
        self.access = ImageAccess.from_settings(settings)
        self.xrays = XrayOutcomes(settings.images.missing_retry_s, clock)
        self.image_errors = self.xrays.errors  # X-rays scored (and cached) as absent, by reason
        self.notes = open_model(settings, f"{prefix}enc_notes", backend)
        self.image = open_model(settings, f"{prefix}enc_cxr", backend)
        self.rescore = open_model(
            settings, f"{prefix}rescore", backend
        )  # numeric encoder + fusion head
        self.model = f"{prefix}encoders+fusion:{self.rescore.version}"
        self.cxr = cxr or CxrInputs()
        self.cxr_embedder = self._cxr_embedder(
            settings, backend, cxr_pipeline or settings.triton.cxr_pipeline
        )
        self.runs = {"notes": 0, "cxr": 0}  # encoder rows computed (for tests and benchmarks)

    def _cxr_embedder(
        self, settings: Settings, backend: str, pipeline: str
    ) -> TritonCxrEmbedder | None:
        if pipeline not in ("auto", "triton", "worker"):
            raise ValueError(f"cxr_pipeline must be auto, triton or worker, not {pipeline!r}")
        if pipeline == "worker" or backend != "triton":
            return None
        client = self.image.client
        if pipeline == "auto" and not client.is_model_ready(CXR_EMBED):
            return None
        return TritonCxrEmbedder(
            client, self._embed_images, timeout_s=settings.triton.timeout_s, access=self.access
        )

    def retries_due(self, now: float) -> list[int]:
        """Admissions whose X-ray was missing and should be read (scored) again now."""
        return self.xrays.missing.due(now)

    def _embed_locally(
        self, uris: list[str], reasons: dict[int, str] | None = None
    ) -> dict[str, np.ndarray]:
        return self._encode_images(*self.cxr(uris, access=self.access, reasons=reasons))

    def _embed_images(self, items: list) -> dict[str, np.ndarray]:
        """Images already loaded (``features.cxr.Encoded``/``Pixels``): not read twice."""
        result = self.cxr.preprocessor(items)
        return self._encode_images(result.tensors, result.ok)

    def _encode_images(self, tensors: np.ndarray, decoded: np.ndarray) -> dict[str, np.ndarray]:
        return {
            **self.image.infer({mi.CXR: tensors}),
            "cxr_ok": decoded.astype(np.float32)[:, None],
        }

    def score(self, inputs: dict) -> tuple[np.ndarray, np.ndarray]:
        hadm_ids = inputs["hadm_id"].tolist()
        uris = [u or "" for u in np.asarray(inputs["cxr_uri"], dtype=object).tolist()]
        mask = inputs[mi.MODALITY_MASK]
        has_notes = (mask[:, mi.MODALITIES.index("radiology")] > 0) | (
            mask[:, mi.MODALITIES.index("discharge")] > 0
        )
        has_image = np.array([bool(u) for u in uris], dtype=bool)
        # Stamps and cached embeddings only where the modality is there: a batch of numeric
        # updates for admissions without notes or images reads no cache at all.
        notes_stamps = [
            _stamp(self.notes.version, inputs[mi.NOTES_RADIOLOGY][i], inputs[mi.NOTES_DISCHARGE][i])
            if present
            else None
            for i, present in enumerate(has_notes.tolist())
        ]
        cxr_stamps = [_stamp(self.image.version, u) if u else None for u in uris]
        keys = [EMB_KEY.format(hadm_id=h) for h in hadm_ids]
        cached: list[dict] = [{} for _ in hadm_ids]
        embedded = np.flatnonzero(has_notes | has_image).tolist()
        if embedded:
            with self.redis.pipeline(transaction=False) as pipe:
                for i in embedded:
                    pipe.hgetall(keys[i])
                for i, row in zip(embedded, pipe.execute()):
                    cached[i] = {k.decode(): v for k, v in row.items()}

        def run_notes(rows):
            return self.notes.infer({k: inputs[k][rows] for k in self.notes.inputs})

        failed: dict[int, str] = {}
        read: list[int] = []

        def run_cxr(rows):
            embed = self.cxr_embedder or self._embed_locally
            reasons: dict[int, str] = {}
            out = embed([uris[i] for i in rows], reasons)
            failed.update({rows[j]: reason for j, reason in reasons.items()})
            read.extend(rows)
            return out

        updates: list[dict] = [{} for _ in hadm_ids]
        notes = self._embeddings(
            "notes", self.notes.widths, has_notes, notes_stamps, cached, run_notes, updates
        )
        image = self._embeddings(
            "cxr",
            {**self.image.widths, "cxr_ok": 1},
            has_image,
            cxr_stamps,
            cached,
            run_cxr,
            updates,
        )
        # An X-ray not there yet is scored absent now, but not cached: the next try reads it.
        for i in self.xrays.settle(hadm_ids, uris, read, failed):
            for name in ("cxr_stamp", "cxr_ok", *self.image.widths):
                updates[i].pop(name, None)
        arrays = {
            **inputs,
            **notes,
            **image,
            mi.MODALITY_MASK: _mask_with_decoded(inputs, image["cxr_ok"][:, 0] > 0.5),
        }
        out = self.rescore.infer({k: arrays[k] for k in self.rescore.inputs})
        if any(updates):
            with self.redis.pipeline(transaction=False) as pipe:
                for key, fields in zip(keys, updates):
                    if fields:
                        pipe.hset(key, mapping=fields)
                        pipe.expire(key, EMB_TTL_S)
                pipe.execute()
        return out[mi.LOS_DAYS].reshape(-1), out[mi.MORTALITY].reshape(-1)

    def _embeddings(
        self, modality: str, widths: dict[str, int], present, stamps, cached, run, updates
    ) -> dict[str, np.ndarray]:
        """Zeros where the modality is absent, cached rows where the stamp matches, and
        ``run`` on the rest (recorded in ``updates`` for the cache)."""
        stamp_field = f"{modality}_stamp"
        stale = [
            i
            for i, stamp in enumerate(stamps)
            if present[i] and cached[i].get(stamp_field) != stamp
        ]
        fresh = run(stale) if stale else {}
        self.runs[modality] += len(stale)
        for j, i in enumerate(stale):
            updates[i][stamp_field] = stamps[i]
            updates[i].update(
                {name: values[j].astype(np.float32).tobytes() for name, values in fresh.items()}
            )
        out = {name: np.zeros((len(stamps), width), np.float32) for name, width in widths.items()}
        position = {i: j for j, i in enumerate(stale)}
        for i in np.flatnonzero(present):
            for name in widths:
                out[name][i] = (
                    fresh[name][position[i]]
                    if i in position
                    else np.frombuffer(cached[i][name], np.float32)
                )
        return out


SCORERS = ("cached", "full")


def build_scoring(
    settings: Settings, client: redis.Redis, scorer: str = "cached", backend: str = "triton"
) -> tuple[OnlineFeatures, CachedEncoderScorer | FullModelScorer]:
    """The stream worker's (features, scorer): the published feature set in Redis, scored by
    ``cached`` (``CachedEncoderScorer``) or ``full`` (``FullModelScorer``) on ``backend``.

    Raises ``LookupError`` where no feature set is published, ``RuntimeError`` where a model
    is not ready and ``ValueError`` for an unknown scorer or backend.
    """
    from features.online import OnlineStore
    from m3t.allocator import tune_allocator

    if scorer not in SCORERS:
        raise ValueError(f"scorer must be {' or '.join(SCORERS)}, not {scorer!r}")
    tune_allocator()  # batch reads allocate large numpy arrays: keep them off mmap
    features = OnlineFeatures(
        OnlineStore.current(client, max_stay_days=settings.stream.max_stay_days)
    )
    if scorer == "cached":
        return features, CachedEncoderScorer(settings, client, backend=backend)
    return features, FullModelScorer(settings, backend=backend)
