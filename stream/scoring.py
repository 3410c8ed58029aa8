"""Scoring M3T-LM on Triton from the online feature store.

Two paths give the same numbers, on Triton or, for development, in-process with ONNX
Runtime on the same published ONNX files (``backend="onnx"``):

* ``FullModelScorer``: every rescoring runs the whole model (``m3t_lm``), X-ray decode
  included. Its base, ``ModelScorer``, sends the batch's arrays to one model as they are.
* ``CachedEncoderScorer``: the per-modality encoders run only when their input changed (a
  new X-ray: the X-ray encoder once; a new note: the notes encoder once); their embeddings
  are cached in Redis. A numeric update re-runs only the numeric encoder and the fusion
  head, in one call (``m3t_rescore``). With explanations on (``stream.explanations``),
  ``m3t_explain`` gives the contributions of each feature group and modality to the
  mortality risk of the admissions whose score is to be explained (``contributions``), on
  the inputs they were scored from (``explain_inputs``), after the batch
  (``stream.reasoner``).

A chest X-ray that cannot be read or decoded is scored as absent (its ``modality_mask``
flag cleared), exactly as the offline builder treats it; one not there yet is awaited first
(``stream.xrays``), the scorers offering its admission for another try (``retries_due``).
The models are ``stream.models``'. ``build_scoring`` builds the stream worker's (features,
scorer) pair from the published feature set.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

import numpy as np
import redis

from features import model_inputs as mi
from m3t.settings import Settings
from stream.models import open_model
from stream.xrays import CXR_EMBED, CxrInputs, TritonCxrEmbedder, XrayOutcomes

EMB_KEY = "m3t:emb:{{{hadm_id}}}"
# Embeddings (and an X-ray recorded as absent) are kept this long after the last change.
EMB_TTL_S = 7 * 24 * 3600
CXR_COLUMN = mi.MODALITIES.index("cxr")
EXPLAIN_ROWS = 4  # admissions per m3t_explain request (see CachedEncoderScorer.contributions)

log = logging.getLogger(__name__)


class OnlineFeatures:
    """The stream worker's view of ``features.online.OnlineStore``."""

    def __init__(self, store):
        self.store = store

    def apply(self, events: list) -> list:
        """Apply events; returns those the store refused, each with its reason."""
        return self.store.write_batch(events).refused

    def inputs(self, hadm_ids: list[int]) -> tuple[dict, list[float]]:
        """The batch's model inputs, with each admission's ``status`` (open, discharged,
        cancelled) and ``ward`` from the same read."""
        arrays, status = self.store.read_inputs_and_status(hadm_ids)
        arrays["hadm_id"] = np.asarray(hadm_ids, dtype=np.int64)
        arrays["status"] = np.array([s for s, _ in status], dtype=object)
        arrays["ward"] = np.array([w for _, w in status], dtype=object)
        return arrays, (arrays["as_of"] * 3600.0).tolist()  # epoch hours -> epoch seconds


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
        return out[mi.LOS_REMAINING].reshape(-1), out[mi.MORTALITY].reshape(-1)

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
        from features.image_files import ImageAccess

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
        explainer=None,
    ):
        from features.image_files import ImageAccess

        self.redis = client
        # With an explainer (``stream.explanations.Explainer``), scores come with their reasons.
        self.explainer = explainer
        self.access = ImageAccess.from_settings(settings)
        self.xrays = XrayOutcomes(settings.images.missing_retry_s, clock)
        self.image_errors = self.xrays.errors  # X-rays scored (and cached) as absent, by reason
        self.notes = open_model(settings, f"{prefix}enc_notes", backend)
        self.image = open_model(settings, f"{prefix}enc_cxr", backend)
        self.rescore = open_model(
            settings, f"{prefix}rescore", backend
        )  # numeric encoder + fusion head
        self.explain = open_model(settings, f"{prefix}explain", backend) if explainer else None
        self._explain_inputs: dict[str, np.ndarray] = {}
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
        los, mortality, _ = self.score_explained(inputs)
        return los, mortality

    def score_explained(self, inputs: dict) -> tuple[np.ndarray, ...]:
        """(remaining stay, mortality, the modality mask the model saw: an X-ray that could
        not be read counts as absent); ``contributions`` explains these scores after."""
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
        seen = _mask_with_decoded(inputs, image["cxr_ok"][:, 0] > 0.5)
        arrays = {**inputs, **notes, **image, mi.MODALITY_MASK: seen}
        out = self.rescore.infer({k: arrays[k] for k in self.rescore.inputs})
        if self.explain is not None:
            self._explain_inputs = {k: arrays[k] for k in self.explain.inputs}
        if any(updates):
            with self.redis.pipeline(transaction=False) as pipe:
                for key, fields in zip(keys, updates):
                    if fields:
                        pipe.hset(key, mapping=fields)
                        pipe.expire(key, EMB_TTL_S)
                pipe.execute()
        return out[mi.LOS_REMAINING].reshape(-1), out[mi.MORTALITY].reshape(-1), seen

    def explain_inputs(self, rows: list[int]) -> list[dict[str, np.ndarray]]:
        """``m3t_explain``'s inputs for each of these rows of the batch ``score_explained``
        scored last, each a copy of its own ([1, ...]), to explain after the batch."""
        return [{k: v[i : i + 1].copy() for k, v in self._explain_inputs.items()} for i in rows]

    def contributions(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """[rows, N_CONTRIBUTIONS]: what each feature group and modality added to the
        mortality risk of these rows of ``m3t_explain``'s inputs. Sent a few rows at a
        time, one request after another: the graph runs ~24 copies of each row, and a large
        batch of them runs slower per row (its working set outgrows the CPU's caches)."""
        n = len(next(iter(arrays.values())))
        parts = [
            self.explain.infer({k: v[start : start + EXPLAIN_ROWS] for k, v in arrays.items()})[
                mi.CONTRIBUTIONS
            ]
            for start in range(0, n, EXPLAIN_ROWS)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

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
        explainer = None
        if settings.stream.explanations:
            from stream.explanations import Explainer

            explainer = Explainer(client, features.store, settings.stream.explain_min_change)
        return features, CachedEncoderScorer(settings, client, backend=backend, explainer=explainer)
    if settings.stream.explanations:
        log.warning("explanations come with the cached scorer only: scoring without them")
    return features, FullModelScorer(settings, backend=backend)
