"""The paper's protocol on a MIMIC-IV copy, in one command: cohort, dataset, training, evaluation.

``m3t train protocol --mimic MIMIC-IV --note MIMIC-IV-NOTE --cxr MIMIC-CXR-JPG --out DIR``
takes the three PhysioNet downloads as they unpack (``mimic-iv-2.2/``, ``mimic-iv-note/2.2/``,
``mimic-cxr-jpg/2.0.0/``), links them into the layout ``ingest.mimic`` reads (``DIR/cohort/``)
and runs, with the project's defaults:

1. read every admission's events, timed by availability (``ingest.mimic``);
2. the cohort: adults (age at admission >= ``min_age``, 18), with an admission and a
   discharge recorded (the labels' source); with ``require_cxr``, only stays with a chest
   X-ray study during the stay (the paper's multimodal cohort);
3. ``m3t features build``'s point-in-time examples at every cutoff of the stream policy,
   the X-rays preprocessed;
4. ``m3t train run``, then ``m3t train evaluate`` (baselines, ablations, seeds).

``DIR/protocol.json`` records the sources, the cohort and why admissions were left out, the
dataset's size and the headline figures; ``DIR/run/evaluation.md`` is the full table. The
bundled MIMIC-IV demo (100 patients, no notes, no X-rays) runs it end to end as a smoke
test: its figures mean nothing at that size.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path


class ProtocolError(ValueError):
    """The sources or the cohort cannot be used (raised before any training)."""


@dataclass(frozen=True)
class Sources:
    mimic: Path  # holds hosp/ (and icu/)
    note: Path | None = None  # MIMIC-IV-Note: holds note/ (or is it)
    cxr: Path | None = None  # MIMIC-CXR-JPG: holds mimic-cxr-2.0.0-metadata.csv.gz and files/

    def link(self, folder: Path) -> Path:
        """``folder`` in the reader's layout, each part a symbolic link into a source."""
        from ingest.mimic import CXR_METADATA, find_table

        parts = {"hosp": self.mimic / "hosp", "icu": self.mimic / "icu"}
        if self.note is not None:
            parts["note"] = self.note / "note" if (self.note / "note").is_dir() else self.note
        if self.cxr is not None:
            if find_table(self.cxr, CXR_METADATA) is None:
                raise ProtocolError(f"--cxr: no {CXR_METADATA}.csv[.gz] in {self.cxr}")
            parts["mimic-cxr-jpg"] = self.cxr
        if find_table(self.mimic, "hosp/admissions") is None:
            raise ProtocolError(f"--mimic: no hosp/admissions.csv[.gz] in {self.mimic}")
        folder.mkdir(parents=True, exist_ok=True)
        for name, target in parts.items():
            if not target.is_dir():
                continue
            link = folder / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target.resolve(), target_is_directory=True)
        return folder


@dataclass(frozen=True)
class Cohort:
    min_age: float = 18.0
    require_cxr: bool = False

    def exclusion(self, events: list) -> str | None:
        """Why an admission is left out of the cohort, or None when it is in."""
        admission = next((e for e in events if e.type == "admission"), None)
        if admission is None:
            return "no_admission_event"
        if not any(e.type == "discharge" for e in events):
            return "no_discharge_event"
        if admission.payload.age < self.min_age:
            return "under_min_age"
        if self.require_cxr and not any(e.type == "cxr" for e in events):
            return "no_cxr_during_stay"
        return None

    def select(self, admissions: Iterable[list]) -> tuple[list[list], dict[str, int]]:
        kept, left_out = [], Counter()
        for events in admissions:
            reason = self.exclusion(events)
            if reason is None:
                kept.append(events)
            else:
                left_out[reason] += 1
        return kept, dict(left_out)


def run(
    sources: Sources,
    out: Path,
    cohort: Cohort = Cohort(),
    train_config=None,
    seeds: int = 3,
    n_boot: int = 500,
    cxr_device: str = "auto",
    progress: bool = True,
    workers: int = 1,
) -> dict:
    """Runs the protocol into ``out``; returns (and writes) ``protocol.json``'s content."""
    from features import offline
    from ingest.mimic import MimicReader
    from trainer.data import load_dataset
    from trainer.evaluate import evaluate_run
    from trainer.report import headline
    from trainer.train import TrainConfig, train

    out = Path(out)
    started = time.monotonic()
    layout = sources.link(out / "cohort")
    reader = MimicReader(layout)
    admissions, left_out = cohort.select(reader.admissions())
    if not admissions:
        raise ProtocolError(f"no admission is in the cohort (left out: {left_out})")

    dataset = offline.build(admissions)
    images = None
    if any(uri for uri in dataset.arrays["cxr_uri"].tolist()):
        roots = (layout,) + ((sources.cxr.resolve(),) if sources.cxr else ())
        images = offline.preprocess_cxr(dataset, layout, roots, cxr_device)
    offline.write(dataset, out / "dataset", images)
    built = time.monotonic()

    data = load_dataset(out / "dataset")
    config = train_config or TrainConfig()
    result = train(data, out / "run", config, progress=progress)
    evaluation = evaluate_run(
        data, out / "run", seeds=seeds, n_boot=n_boot, progress=progress, workers=workers
    )

    summary = {
        "sources": {k: str(v) if v else None for k, v in asdict(sources).items()},
        "cohort": {
            **asdict(cohort),
            "admissions": len(admissions),
            "patients": len({events[0].subject_id for events in admissions}),
            "left_out": left_out,
        },
        "reader": reader.stats.as_dict(),
        "dataset": {
            k: dataset.meta[k]
            for k in ("examples", "admissions", "examples_per_split", "skipped_admissions")
        },
        "training": {
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "seconds": round(result.seconds, 1),
        },
        "evaluation": str(out / "run" / "evaluation.md"),
        "test": headline(evaluation),
        "seconds": {
            "read_and_build": round(built - started, 1),
            "total": round(time.monotonic() - started, 1),
        },
    }
    (out / "protocol.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
