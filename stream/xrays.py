"""Chest X-rays for scoring: URIs to the ``cxr`` tensor through the worker's DALI pipeline
(``CxrInputs``), or to embeddings through Triton's DALI ensemble (``TritonCxrEmbedder``); and
what became of each image (``XrayOutcomes``): an X-ray that is not there yet, or whose read
stalled, is awaited with backoff (``MissingImages``) for ``settings.images.missing_retry_s``
before it is recorded as absent; images scored as absent are counted by reason."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient

from features import model_inputs as mi
from stream.models import OUTAGE_STATUSES, TritonModel

# A missing X-ray is tried again after 1 s, then 2, 4, ... at most a minute apart.
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 60.0
CXR_EMBED = "m3t_cxr_embed"  # trainer.publish's ensemble: image bytes -> DALI -> m3t_enc_cxr

log = logging.getLogger(__name__)


class CxrInputs:
    """URIs -> the ``cxr`` tensor through the DALI pipeline, and which images decoded.

    ``access`` (``features.image_files.ImageAccess``): where images may be read from; the scorers
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
        from features.image_files import TRANSIENT

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
        self.access = access  # features.image_files.ImageAccess: where images may be read from
        self.sent = 0  # requests sent (for tests and benchmarks)

    def __call__(
        self, uris: list[str], reasons: dict[int, str] | None = None
    ) -> dict[str, np.ndarray]:
        """``emb_cxr`` and ``cxr_ok`` per URI; ``reasons`` (if given) gets each failed
        image's reason by index."""
        from features.cxr import Encoded, check_encoded, read_images
        from features.image_files import BadImage

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
